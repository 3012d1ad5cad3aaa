"""The velocity networks of SAC Flow-G (from_scratch/sac_flow_gru.py) and SAC Flow-T
(from_scratch/sac_flow_transformer.py) against NumPy computations written from their parameters, the
Markov structure of Flow-T's attention, and a short end-to-end run of each script with non-default
velocity flags (checked in the saved parameters)."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FROM_SCRATCH, OFFLINE_TO_ONLINE, load_script

naive = load_script("sac_flow_naive")
gru = load_script("sac_flow_gru")
transformer = load_script("sac_flow_transformer")
offline_naive = load_script("sac_flow_naive", OFFLINE_TO_ONLINE)
offline_gru = load_script("sac_flow_gru", OFFLINE_TO_ONLINE)
offline_transformer = load_script("sac_flow_transformer", OFFLINE_TO_ONLINE)

OBS_DIM, ACTION_DIM, TIME_DIM, BATCH = 5, 3, 32, 6


def random_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    state = rng.normal(size=(BATCH, OBS_DIM)).astype(np.float32)
    action = rng.normal(size=(BATCH, ACTION_DIM)).astype(np.float32) * 2
    time_features = rng.normal(size=(BATCH, TIME_DIM)).astype(np.float32)
    return state, action, time_features


def perturbed(params, seed: int, scale: float = 0.3):
    """Every parameter moved by Gaussian noise: no zero or unit parameter hides a wrong wiring."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(np.asarray(p) + scale * rng.normal(size=p.shape), jnp.float32) for p in leaves]
    )


def to_numpy(params):
    return jax.tree.map(lambda p: np.asarray(p, np.float64), params)


# ----------------------------------------------------------------------------------------------------
# Flow-G


def sigmoid_np(x):
    return 1.0 / (1.0 + np.exp(-x))


def swish_mlp_np(p, x):
    """(Dense → swish) for each hidden layer, then the output Dense (the last of Dense_0, Dense_1, ...)."""
    layers = sorted(p, key=lambda name: int(name.split("_")[1]))
    for layer in layers[:-1]:
        h = x @ p[layer]["kernel"] + p[layer]["bias"]
        x = h * sigmoid_np(h)
    return x @ p[layers[-1]]["kernel"] + p[layers[-1]]["bias"]


def test_flow_g_gate_starts_at_sigmoid_5():
    policy = gru.make_agent(gru.Args(), ACTION_DIM, np.ones(ACTION_DIM), np.zeros(ACTION_DIM)).policy  # default sizes
    state, action, _ = random_inputs()
    variables = policy.init(
        jax.random.PRNGKey(0), state, action, np.zeros((4, BATCH, ACTION_DIM), np.float32), train=False
    )
    gate_net = variables["params"]["velocity"]["gate_net"]
    assert sorted(gate_net) == ["Dense_0", "Dense_1"] and gate_net["Dense_0"]["kernel"].shape[1] == 512
    gate_output_layer = gate_net["Dense_1"]
    assert np.all(np.asarray(gate_output_layer["kernel"]) == 0.0)
    assert np.all(np.asarray(gate_output_layer["bias"]) == 5.0)
    # Read the gate of the bound module on inputs far from zero: it must not depend on them at initialisation.
    velocity = policy.bind(variables).velocity
    state, action, time_features = (10 * x for x in random_inputs(seed=1))
    gate = np.asarray(nn.sigmoid(velocity.gate_net(np.concatenate([state, action, time_features], axis=-1))))
    assert gate.shape == (BATCH, ACTION_DIM)
    np.testing.assert_allclose(gate, 1.0 / (1.0 + np.exp(-5.0)), rtol=1e-6)


GRU_SCRIPTS = pytest.mark.parametrize("script", [gru, offline_gru], ids=["from_scratch", "offline_to_online"])


@GRU_SCRIPTS
@pytest.mark.parametrize("hidden_layers", [1, 2])  # 1: the released code's (default); 2: --velocity-hidden-layers 2
def test_flow_g_velocity_is_gate_times_candidate_minus_action(script, hidden_layers):
    net = script.VelocityNet(ACTION_DIM, hidden=16, hidden_layers=hidden_layers)
    state, action, time_features = random_inputs()
    params = net.init(jax.random.PRNGKey(2), state, action, time_features)["params"]
    params = perturbed(params, seed=3)
    v = np.asarray(net.apply({"params": params}, state, action, time_features))

    p = to_numpy(params)
    assert len(p["gate_net"]) == len(p["candidate_net"]) == hidden_layers + 1
    x = np.concatenate([state, action, time_features], axis=1).astype(np.float64)
    gate = sigmoid_np(swish_mlp_np(p["gate_net"], x))
    candidate = swish_mlp_np(p["candidate_net"], x)
    assert np.ptp(gate) > 0.1  # the perturbed gate really varies, so the product is tested
    np.testing.assert_allclose(v, gate * (candidate - action), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Naive


def relu_mlp_np(p, x):
    """(Dense → ReLU) × 2, then the output Dense: the naive velocity on x = [s, A, φ(t)]."""
    for layer in ("Dense_0", "Dense_1"):
        x = np.maximum(x @ p[layer]["kernel"] + p[layer]["bias"], 0)
    return x @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]


NAIVE_SCRIPTS = pytest.mark.parametrize("script", [naive, offline_naive], ids=["from_scratch", "offline_to_online"])


@NAIVE_SCRIPTS
def test_naive_velocity_matches_numpy_mlp(script):
    net = script.VelocityNet(ACTION_DIM, 16)
    state, action, time_features = random_inputs(seed=5)
    params = net.init(jax.random.PRNGKey(6), state, action, time_features)["params"]
    params = perturbed(params, seed=7)
    v = np.asarray(net.apply({"params": params}, state, action, time_features))
    x = np.concatenate([state, action, time_features], axis=1).astype(np.float64)
    np.testing.assert_allclose(v, relu_mlp_np(to_numpy(params), x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("script", [naive, gru, transformer, offline_naive, offline_gru, offline_transformer])
def test_one_row_of_time_features_is_broadcast_over_the_batch(script):
    """The rollout passes φ(t_k) as one row for the whole batch: the same velocity as the row repeated per state."""
    sizes = {naive: (16,), gru: (16, 2), transformer: (D_MODEL, N_HEADS, N_LAYERS)}
    sizes |= {offline_naive: sizes[naive], offline_gru: sizes[gru], offline_transformer: sizes[transformer]}
    net = script.VelocityNet(ACTION_DIM, *sizes[script])
    state, action, time_features = random_inputs(seed=11)
    params = net.init(jax.random.PRNGKey(12), state, action, time_features)["params"]
    params = perturbed(params, seed=13)
    one_row = time_features[:1]
    repeated = np.repeat(one_row, BATCH, axis=0)
    v_one_row = net.apply({"params": params}, state, action, one_row)
    v_repeated = net.apply({"params": params}, state, action, repeated)
    assert v_one_row.shape == (BATCH, ACTION_DIM)
    np.testing.assert_allclose(np.asarray(v_one_row), np.asarray(v_repeated), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Flow-T

D_MODEL, N_HEADS, N_LAYERS = 8, 2, 2
FLOW_T_SCRIPTS = pytest.mark.parametrize(
    "script", [transformer, offline_transformer], ids=["from_scratch", "offline_to_online"]
)


def make_transformer_velocity(seed: int = 4, script=transformer):
    net = script.VelocityNet(ACTION_DIM, D_MODEL, N_HEADS, N_LAYERS)
    state, action, time_features = random_inputs()
    params = net.init(jax.random.PRNGKey(seed), state, action, time_features)["params"]
    return net, perturbed(params, seed=seed + 1)


def layer_norm_np(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def gelu_np(x):  # flax's default, the tanh approximation
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def state_embedding_np(p, state):
    """E_S(s) = W_2 swish(W_1 s + b_1) + b_2."""
    hidden = state @ p["state_hidden"]["kernel"] + p["state_hidden"]["bias"]
    hidden = hidden / (1.0 + np.exp(-hidden))
    return hidden @ p["state_embedding"]["kernel"] + p["state_embedding"]["bias"]


def cross_attention_np(p, queries, context):
    """Multi-head attention of `queries` (n, d) over `context` tokens (n, m, d), head by head, row by row."""
    n, heads, head_dim = queries.shape[0], p["query"]["kernel"].shape[1], p["query"]["kernel"].shape[2]
    out = np.zeros((n, queries.shape[1]))
    for row in range(n):
        for h in range(heads):
            q = queries[row] @ p["query"]["kernel"][:, h] + p["query"]["bias"][h]  # (head_dim,)
            k = context[row] @ p["key"]["kernel"][:, h] + p["key"]["bias"][h]  # (m, head_dim)
            value = context[row] @ p["value"]["kernel"][:, h] + p["value"]["bias"][h]
            scores = k @ q / np.sqrt(head_dim)
            weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
            out[row] += (weights @ value) @ p["attention_out"]["kernel"][h]
    return out + p["attention_out"]["bias"]


def random_query_and_key(rng):
    """A query LayerNorm and query and key projections for a block that has none (one context token): with any of
    them that token gets attention weight 1, so the NumPy attention may use these."""
    shape = (D_MODEL, N_HEADS, D_MODEL // N_HEADS)
    norm = {"scale": rng.normal(size=D_MODEL), "bias": rng.normal(size=D_MODEL)}
    query = {"kernel": rng.normal(size=shape), "bias": rng.normal(size=shape[1:])}
    key = {"kernel": rng.normal(size=shape), "bias": rng.normal(size=shape[1:])}
    return norm, query, key


def transformer_velocity_np(p, state, action, time_features):
    """Φ_A = E_A([A, φ(t)]), Φ_S = E_S(s); pre-norm cross-attention blocks; v = W_o(LN(Φ_A))."""
    rng = np.random.default_rng(0)
    x = np.concatenate([action, time_features], axis=1)
    token = x @ p["action_time_embedding"]["kernel"] + p["action_time_embedding"]["bias"]
    state_token = state_embedding_np(p, state)
    for layer in range(N_LAYERS):
        b = dict(p[f"blocks_{layer}"])
        assert "query" not in b and "key" not in b  # one context token: the script computes no query or key
        norm, b["query"], b["key"] = random_query_and_key(rng)
        context = layer_norm_np(b["context_norm"], state_token)[:, None, :]  # one context token per row
        y = token + cross_attention_np(b, layer_norm_np(norm, token), context)
        hidden = gelu_np(layer_norm_np(b["ffn_norm"], y) @ b["ffn_hidden"]["kernel"] + b["ffn_hidden"]["bias"])
        token = y + hidden @ b["ffn_out"]["kernel"] + b["ffn_out"]["bias"]
    return layer_norm_np(p["output_norm"], token) @ p["output"]["kernel"] + p["output"]["bias"]


@FLOW_T_SCRIPTS
def test_flow_t_velocity_matches_numpy_decoder(script):
    net, params = make_transformer_velocity(script=script)
    state, action, time_features = random_inputs(seed=7)
    v = np.asarray(net.apply({"params": params}, state, action, time_features))
    expected = transformer_velocity_np(
        to_numpy(params), *(a.astype(np.float64) for a in (state, action, time_features))
    )
    np.testing.assert_allclose(v, expected, rtol=1e-4, atol=1e-4)


class FlaxAttentionBlock(nn.Module):
    """The decoder block written with flax's own nn.MultiHeadDotProductAttention over (batch, m, d_model) tokens:
    an independent reference for the scripts' block, which computes no query or key for one context token."""

    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, action_token, context_tokens):
        query = nn.LayerNorm(name="query_norm")(action_token[:, None])
        context = nn.LayerNorm(name="context_norm")(context_tokens)
        y = action_token[:, None] + nn.MultiHeadDotProductAttention(self.n_heads, name="cross_attention")(
            query, context
        )
        hidden = nn.gelu(nn.Dense(4 * self.d_model, name="ffn_hidden")(nn.LayerNorm(name="ffn_norm")(y)))
        return (y + nn.Dense(self.d_model, name="ffn_out")(hidden))[:, 0]


@FLOW_T_SCRIPTS
@pytest.mark.parametrize("context_tokens", [1, 2])
def test_flow_t_decoder_block_equals_flax_multi_head_attention(script, context_tokens):
    """The block is a real multi-head cross-attention: with two context tokens (queries and keys matter) and with
    one (the script's case, no query or key computed) it equals flax's attention with the same parameters."""
    rng = np.random.default_rng(context_tokens)
    action_token = rng.normal(size=(BATCH, D_MODEL)).astype(np.float32)
    context = rng.normal(size=(BATCH, context_tokens, D_MODEL)).astype(np.float32)

    block = script.DecoderBlock(D_MODEL, N_HEADS)
    params = perturbed(block.init(jax.random.PRNGKey(0), action_token, context)["params"], seed=1)
    assert ("query" in params) == ("key" in params) == (context_tokens > 1)
    reference = FlaxAttentionBlock(D_MODEL, N_HEADS)
    reference_params = perturbed(reference.init(jax.random.PRNGKey(1), action_token, context)["params"], seed=2)
    shared = ("query_norm", "context_norm", "ffn_norm", "ffn_hidden", "ffn_out")  # no query_norm for one token
    reference_params = {**reference_params, **{name: params[name] for name in shared if name in params}}
    attention = {name: params[name] for name in ("query", "key", "value") if name in params}
    reference_params["cross_attention"] = {**reference_params["cross_attention"], **attention}
    reference_params["cross_attention"]["out"] = params["attention_out"]

    out = block.apply({"params": params}, action_token, context)
    expected = reference.apply({"params": reference_params}, action_token, context)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    if context_tokens > 1:  # the attention weights depend on the query: another action token, another mix
        moved = block.apply({"params": params}, action_token + 1.0, context)
        moved_expected = reference.apply({"params": reference_params}, action_token + 1.0, context)
        np.testing.assert_allclose(np.asarray(moved), np.asarray(moved_expected), rtol=1e-5, atol=1e-5)


def test_flow_t_flow_steps_do_not_attend_to_each_other():
    """Rows = the K flow steps of one state, each with its own (A_k, φ(t_k)): changing one row's A_k changes
    that row's velocity only (no self-attention across flow steps, the rollout stays Markov)."""
    net, params = make_transformer_velocity()
    state, action, time_features = random_inputs(seed=8)
    state[:] = state[0]  # the same state for every flow step
    v = np.asarray(net.apply({"params": params}, state, action, time_features))
    changed_action = action.copy()
    changed_action[2] += 1.5
    v_changed = np.asarray(net.apply({"params": params}, state, changed_action, time_features))
    others = np.arange(BATCH) != 2
    np.testing.assert_allclose(v_changed[others], v[others], rtol=0, atol=1e-6)
    assert np.abs(v_changed[2] - v[2]).max() > 1e-3


def test_transformer_rejects_heads_that_do_not_divide_d_model(tmp_path):
    result = subprocess.run(
        [sys.executable, str(FROM_SCRATCH / "sac_flow_transformer.py"), "--d-model", "30", "--n-heads", "4"],
        cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --n-heads 4 does not divide --d-model 30"
