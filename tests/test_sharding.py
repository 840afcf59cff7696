"""Mesh construction and the logical-axis rules (sharded loading and forward/backward on 8 fake
CPU devices: multidevice/test_sharded_model.py)."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from htpo_jax.infra.sharding import (
    LOGICAL_AXIS_RULES,
    constrain,
    logical_to_mesh_spec,
    make_mesh,
    without_axes,
)


class FakeMesh:
    """Only `.shape` is read by the rules: lets one CPU device test an 8-way layout."""

    def __init__(self, **shape):
        self.shape = shape


MESH_222 = FakeMesh(data=2, fsdp=2, tensor=2)


def test_rules_map_parameters_and_activations():
    assert logical_to_mesh_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert logical_to_mesh_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_mesh_spec(("act_batch", "act_seq", "act_embed")) == P(
        ("data", "fsdp"), None, None
    )
    names = [name for name, _ in LOGICAL_AXIS_RULES]
    assert len(names) == len(set(names))  # one rule per name


def test_indivisible_dims_are_replicated():
    # 2 kv heads on tensor=4: replicated; 64 on tensor=4: sharded.
    mesh = FakeMesh(data=1, fsdp=2, tensor=4)
    assert logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P(
        "fsdp", None, None
    )
    assert logical_to_mesh_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == P(
        "fsdp", "tensor", None
    )
    # batch 2 on data=2 x fsdp=2: only the prefix that divides (data).
    assert logical_to_mesh_spec(("act_batch", "act_seq"), (2, 8), MESH_222) == P("data", None)


def test_a_mesh_axis_is_used_once_per_array():
    rules = (("a", "fsdp"), ("b", ("data", "fsdp")))
    assert logical_to_mesh_spec(("a", "b"), rules=rules) == P("fsdp", "data")


def test_unknown_logical_name_is_an_error():
    with pytest.raises(KeyError, match="no rule"):
        logical_to_mesh_spec(("nonsense",))


def test_make_mesh_sizes():
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.shape["fsdp"] == jax.device_count()
    with pytest.raises(ValueError, match="needs"):
        make_mesh(data=2, fsdp=3, tensor=1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_constrain_is_a_no_op_without_a_mesh():
    x = jax.numpy.ones((2, 3))
    assert constrain(x, ("act_batch", "act_embed")) is x


def test_without_axes_drops_only_the_named_mesh_axes():
    # The rollout engine replicates the weights over the batch axes and, inside its shard_map,
    # constrain() drops the manual axes from every spec this way.
    spec = P(("data", "fsdp"), "tensor", None, "fsdp")
    assert without_axes(spec, {"data", "fsdp"}) == P(None, "tensor", None, None)
    assert without_axes(spec, {"data"}) == P("fsdp", "tensor", None, "fsdp")
    assert without_axes(spec, set()) == spec
