"""Command-line tools: compile_check (and its programs), export, evaluate, plot.
The top layer: may import anything.
"""
