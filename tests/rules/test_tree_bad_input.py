"""Bad input to `verify_tree`, `draw_children` and the tree shapes raises ValueError or TypeError
whose message names the argument at fault."""

from __future__ import annotations

import pytest
import torch

from specsample.drafters.children import draw_children
from specsample.rules import chain_parents, draw_uniforms, tree_parents, verify_tree
from specsample.rules.reference import reference_tree_rule

BATCH, VOCAB = 2, 5
PARENTS = tree_parents((2, 1))  # [-1, -1, 0, 1]
N = len(PARENTS)
SHAPE = r"\[batch, n(\+1)?, vocab\]"  # in messages about draft_probs or target_probs


def valid_inputs(dtype=torch.float32):
    """(draft_tokens, draft_probs, target_probs) that verify_tree accepts."""
    g = torch.Generator().manual_seed(0)
    target_probs = torch.softmax(torch.randn(BATCH, N + 1, VOCAB, generator=g), -1).to(dtype)
    draft_probs = torch.softmax(torch.randn(BATCH, N, VOCAB, generator=g), -1).to(dtype)
    draft_tokens = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    return draft_tokens, draft_probs, target_probs


def call(draft_tokens=None, parents=None, draft_probs="valid", target_probs=None, **options):
    """verify_tree on valid inputs with the given ones replaced."""
    valid_tokens, valid_draft, valid_target = valid_inputs()
    options.setdefault("generator", torch.Generator().manual_seed(1))
    return verify_tree(
        valid_tokens if draft_tokens is None else draft_tokens,
        PARENTS if parents is None else parents,
        valid_draft if isinstance(draft_probs, str) else draft_probs,
        valid_target if target_probs is None else target_probs,
        **options,
    )


@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_valid_inputs_pass_and_give_the_reference_rule_result(point_mass):
    result = call(draft_probs=None if point_mass else "valid")
    draft_tokens, draft_probs, target_probs = valid_inputs()
    accept, sample = draw_uniforms(BATCH, N, torch.Generator().manual_seed(1), torch.device("cpu"))
    expected = reference_tree_rule(
        draft_tokens,
        PARENTS,
        None if point_mass else draft_probs,
        target_probs,
        torch.ones(BATCH, N, dtype=torch.bool),
        accept,
        sample,
    )
    assert torch.equal(result.tokens, expected.tokens)
    assert torch.equal(result.num_accepted, expected.num_accepted)
    assert torch.equal(result.path, expected.path)


@pytest.mark.parametrize(
    ("draft_tokens", "error", "got"),
    [
        ([[0, 1, 2, 3], [4, 3, 2, 1]], TypeError, "got list"),
        (torch.zeros(BATCH, N), TypeError, "got torch.float32"),
        (torch.zeros(BATCH, N, dtype=torch.bool), TypeError, "got torch.bool"),
        (torch.zeros(N, dtype=torch.int64), ValueError, r"got shape \(4,\)"),
    ],
    ids=["list", "float", "bool", "rank-1"],
)
def test_draft_tokens_of_wrong_type_or_rank_are_rejected(draft_tokens, error, got):
    """The message names the argument, what it expects and what arrived."""
    with pytest.raises(error, match=rf"^draft_tokens: expected .*\[batch, n\].*{got}$"):
        call(draft_tokens=draft_tokens)


@pytest.mark.parametrize(
    ("parents", "error", "message"),
    [
        ([-1, -1, 0, 1], TypeError, r"^parents: expected .*\[n=4\].*got list$"),
        (torch.tensor([-1.0, -1.0, 0.0, 1.0]), TypeError, r"^parents: .*got torch.float32$"),
        (torch.tensor([-1, -1, 0]), ValueError, r"parents.*\[n=4\]"),
        (torch.tensor([[-1, -1, 0, 1]]), ValueError, r"parents.*\[n=4\]"),
        (torch.tensor([-1, -1, 2, 1]), ValueError, r"parents\[2\] = 2"),
        (torch.tensor([-1, -1, 3, 1]), ValueError, r"parents.*topological.*parents\[2\] = 3"),
        (torch.tensor([0, -1, 0, 1]), ValueError, r"parents\[0\] = 0"),
        (torch.tensor([-1, -2, 0, 1]), ValueError, r"parents\[1\] = -2"),
    ],
    ids=["list", "float", "short", "rank-2", "self", "later", "first-not-root", "below-root"],
)
def test_parents_that_are_not_a_forest_in_topological_order_are_rejected(parents, error, message):
    with pytest.raises(error, match=message):
        call(parents=parents)


@pytest.mark.parametrize("name", ["draft_probs", "target_probs"])
@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda p: p.tolist(),
            TypeError,
            rf"expected a float tensor {SHAPE}, got list",
        ),
        (lambda p: (p * 100).long(), TypeError, "expected float64, .*, got torch.int64"),
        (lambda p: p[0], ValueError, rf"expected 3 dimensions {SHAPE}, got shape"),
    ],
    ids=["list", "int64", "rank-2"],
)
def test_probabilities_of_wrong_type_or_rank_are_rejected(name, make, error, message):
    _, draft_probs, target_probs = valid_inputs()
    bad = make(draft_probs if name == "draft_probs" else target_probs)
    with pytest.raises(error, match=f"^{name}: {message}"):
        call(**{name: bad})


def test_shapes_that_do_not_fit_the_tree_are_rejected():
    _, draft_probs, target_probs = valid_inputs()
    with pytest.raises(
        ValueError, match=r"^target_probs: .*n\+1=5.*\(row 0 is the root's distribution"
    ):
        call(target_probs=target_probs[:, :N])
    with pytest.raises(ValueError, match="target_probs"):
        call(target_probs=target_probs[:1])
    with pytest.raises(ValueError, match="draft_probs"):
        call(draft_probs=draft_probs[:, : N - 1])
    with pytest.raises(ValueError, match="draft_probs.*vocab"):
        call(draft_probs=torch.nn.functional.pad(draft_probs, (0, 1)))
    with pytest.raises(ValueError, match="target_probs.*vocabulary"):
        call(target_probs=torch.zeros(BATCH, N + 1, 0), draft_probs=None)


@pytest.mark.parametrize(
    ("node_valid", "error", "got"),
    [
        (torch.ones(BATCH, N), TypeError, "got torch.float32"),
        ([[True] * N] * BATCH, TypeError, "got list"),
        (torch.ones(BATCH, N - 1, dtype=torch.bool), ValueError, r"got \(2, 3\)"),
        (torch.ones(N, dtype=torch.bool), ValueError, r"got \(4,\)"),
    ],
    ids=["float", "list", "short", "rank-1"],
)
def test_node_valid_of_wrong_type_or_shape_is_rejected(node_valid, error, got):
    with pytest.raises(error, match=rf"^node_valid: expected .*{got}$"):
        call(node_valid=node_valid)


def test_a_valid_node_under_an_invalid_parent_is_rejected():
    node_valid = torch.ones(BATCH, N, dtype=torch.bool)
    node_valid[1, 0] = False  # node 2 is node 0's child
    with pytest.raises(ValueError, match=r"node_valid: node 2 is valid in row 1.*parent node 0"):
        call(node_valid=node_valid)
    node_valid[1, 2] = False
    call(node_valid=node_valid)


@pytest.mark.parametrize("name", ["draft_tokens", "draft_probs", "target_probs", "node_valid"])
def test_tensors_on_different_devices_are_rejected(name):
    """Without a second real device the meta device stands in for one; any one of the four
    tensors elsewhere is caught, and the message lists all four."""
    draft_tokens, draft_probs, target_probs = valid_inputs()
    inputs = {
        "draft_tokens": draft_tokens,
        "draft_probs": draft_probs,
        "target_probs": target_probs,
        "node_valid": torch.ones(BATCH, N, dtype=torch.bool),
    }
    inputs[name] = inputs[name].to("meta")
    message = r"^draft_tokens, draft_probs, target_probs, node_valid: expected one device, got cpu"
    with pytest.raises(ValueError, match=message):
        call(**inputs, validate=False)


@pytest.mark.parametrize("bad_id", [-1, VOCAB])
@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_token_ids_out_of_range_are_rejected_even_without_validation(bad_id, point_mass):
    draft_tokens = torch.tensor([[0, 1, 2, 3], [4, 3, bad_id, 1]])
    for validate in [True, False]:
        with pytest.raises(ValueError, match="draft_tokens.*vocab"):
            call(
                draft_tokens=draft_tokens,
                draft_probs=None if point_mass else "valid",
                validate=validate,
            )


def test_out_of_range_ids_at_invalid_nodes_are_ignored():
    """The same result as with valid ids there: an invalid node is never read."""
    node_valid = torch.tensor([[True, True, False, True], [True, True, True, False]])
    padded_ids = torch.tensor([[0, 1, -1, 3], [4, 3, 2, VOCAB]])
    padded = call(draft_tokens=padded_ids, node_valid=node_valid)
    valid = call(draft_tokens=torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]]), node_valid=node_valid)
    assert torch.equal(padded.tokens, valid.tokens)
    assert torch.equal(padded.num_accepted, valid.num_accepted)
    assert torch.equal(padded.path, valid.path)
    assert 2 not in padded.path[0].tolist() and 3 not in padded.path[1].tolist()


def test_a_drafted_token_with_draft_probability_zero_is_rejected():
    draft_tokens, draft_probs, _ = valid_inputs()
    draft_probs = draft_probs.clone()
    draft_probs[1, 2, 0] += draft_probs[1, 2, 2]
    draft_probs[1, 2, 2] = 0  # draft_tokens[1, 2] = 2
    with pytest.raises(ValueError, match=r"draft_probs.*draft_tokens\[1, 2\]"):
        call(draft_probs=draft_probs, validate=False)


@pytest.mark.parametrize("name", ["draft_probs", "target_probs"])
@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda row: row.__setitem__(3, float("nan")), "finite"),
        (lambda row: (row.__setitem__(1, row[1] + 1.0), row.__setitem__(4, row[4] - 1.0)), "non"),
        (lambda row: row.mul_(2.0), "sum to 1"),
    ],
    ids=["nan", "negative", "logits"],
)
def test_bad_probability_values_are_rejected_and_validate_false_skips_them(name, corrupt, message):
    _, draft_probs, target_probs = valid_inputs()
    bad = (draft_probs if name == "draft_probs" else target_probs).clone()
    corrupt(bad[1, 3])  # draft row of node 3, or target row after node 2
    with pytest.raises(ValueError, match=f"^{name}: .*{message}"):
        call(**{name: bad})
    if message == "sum to 1":
        call(**{name: bad}, validate=False)


def test_rows_of_invalid_nodes_are_not_validated():
    _, draft_probs, target_probs = valid_inputs()
    draft_probs, target_probs = draft_probs.clone(), target_probs.clone()
    draft_probs[0, 3] = float("nan")
    target_probs[0, 4] = float("nan")  # after node 3
    node_valid = torch.tensor([[True, True, True, False], [True] * N])
    call(draft_probs=draft_probs, target_probs=target_probs, node_valid=node_valid)


@pytest.mark.parametrize("generator", [None, 0, torch.Generator().manual_seed(0).get_state()])
def test_a_generator_that_is_not_a_torch_generator_is_rejected(generator):
    with pytest.raises(TypeError, match="generator"):
        call(generator=generator)


def test_the_generator_is_keyword_only_and_required():
    draft_tokens, draft_probs, target_probs = valid_inputs()
    with pytest.raises(TypeError):
        verify_tree(draft_tokens, PARENTS, draft_probs, target_probs)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        verify_tree(draft_tokens, PARENTS, draft_probs, target_probs, torch.Generator())  # type: ignore[misc]


# draw_children and the tree shapes.


@pytest.mark.parametrize(
    ("arguments", "error", "name"),
    [
        ({"q": [[0.5, 0.5]]}, TypeError, "q"),
        ({"q": torch.ones(2, 3, dtype=torch.int64)}, TypeError, "q"),
        ({"q": torch.ones(3) / 3}, ValueError, "q"),
        ({"m": 0}, ValueError, "m"),
        ({"m": 2.0}, ValueError, "m"),
        ({"mode": "beam"}, ValueError, "mode"),
        ({"generator": None}, TypeError, "generator"),
    ],
    ids=["list", "int", "rank-1", "zero-children", "float-m", "mode", "generator"],
)
def test_draw_children_rejects_bad_arguments_naming_them(arguments, error, name):
    options = {
        "q": torch.full((2, 3), 1 / 3),
        "m": 2,
        "mode": "iid",
        "generator": torch.Generator(),
        **arguments,
    }
    with pytest.raises(error, match=name):
        draw_children(options["q"], options["m"], options["mode"], options["generator"])


@pytest.mark.parametrize("branching", [(0,), (2, -1), (2.0,), (True,)])
def test_tree_parents_rejects_a_branching_that_is_not_positive_integers(branching):
    with pytest.raises(ValueError, match="branching"):
        tree_parents(branching)


@pytest.mark.parametrize(
    ("m", "depth", "name"),
    [
        (0, 2, "m"),
        (True, 2, "m"),
        (2.0, 2, "m"),
        (2, -1, "depth"),
        (2, True, "depth"),
        (2, 1.0, "depth"),
    ],
)
def test_chain_parents_rejects_bad_counts(m, depth, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        chain_parents(m, depth)
