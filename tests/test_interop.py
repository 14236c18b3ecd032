"""Interop: Hugging Face import/export against mlx-lm's independent implementations, upcycling.

Tiny random models in each supported Hugging Face format are written here (config.json and
safetensors by hand, a tokenizer built with the `tokenizers` library); nothing is downloaded.
Logits are compared with mlx-lm's own model classes loading the same directory, so a wrong
name, transpose, RoPE convention or routing rule shows up as a large difference.
"""

import dataclasses
import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from tinymoe.config import ModelConfig, load_preset  # noqa: E402
from tinymoe.errors import TinyMoeError  # noqa: E402

TOL = 1e-4  # float32: different summation orders, logits of magnitude ~10


# ----------------------------------------------------------------------------- builders


def _w(rng, *shape, scale=0.1):
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))


def hf_tokenizer_files(path, vocab=280):
    """A small byte-level BPE trained here, plus a tokenizer_config.json naming an EOS token."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog ", "hello world, hello experts and routers"] * 20
    tok.train_from_iterator(text, tk.trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": "<eos>"}))
    return tok


def build_hf_dir(path, arch, *, vocab=300, d=32, layers=3, heads=4, kv=2, ff=64, moe_ff=48, experts=4,
                 topk=2, tie=False, seed=0, shared=0, **extra):
    """A random `arch` model in Hugging Face layout (one tensor per expert); `shared` experts
    (of width shared x moe_ff) get random weights, else the file carries what the format
    always has (Qwen2-MoE: a shared expert whose down_proj is zero; GLM: one zero shared expert)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    dh = d // heads
    cfg = {"model_type": arch, "vocab_size": vocab, "hidden_size": d, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ff,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tie,
           "max_position_embeddings": 128, "hidden_act": "silu"}
    if arch == "mixtral":
        cfg.update(num_local_experts=experts, num_experts_per_tok=topk, intermediate_size=moe_ff)
    elif arch == "qwen2_moe":
        cfg.update(num_experts=experts, num_experts_per_tok=topk, moe_intermediate_size=moe_ff,
                   shared_expert_intermediate_size=16, norm_topk_prob=False, decoder_sparse_step=1)
    elif arch == "ernie4_5_moe":
        cfg.update(moe_num_experts=experts, moe_k=topk, moe_intermediate_size=moe_ff, moe_layer_start_index=1,
                   moe_layer_interval=1, moe_num_shared_experts=shared, use_bias=False)
    elif arch == "glm4_moe":
        cfg.update(n_routed_experts=experts, num_experts_per_tok=topk, moe_intermediate_size=moe_ff,
                   n_shared_experts=max(shared, 1), first_k_dense_replace=1, norm_topk_prob=True,
                   routed_scaling_factor=1.0, n_group=1, topk_group=1, use_qk_norm=False,
                   partial_rotary_factor=1.0, attention_bias=False, head_dim=dh, rope_scaling=None)
    if arch == "qwen2_moe" and shared:
        cfg["shared_expert_intermediate_size"] = shared * moe_ff
    cfg.update(extra)
    (path / "config.json").write_text(json.dumps(cfg))
    t = {"model.embed_tokens.weight": _w(rng, vocab, d, scale=1.0), "model.norm.weight": 1 + _w(rng, d)}
    if not tie:
        t["lm_head.weight"] = _w(rng, vocab, d)
    for i in range(layers):
        h = f"model.layers.{i}"
        t[f"{h}.input_layernorm.weight"] = 1 + _w(rng, d)
        t[f"{h}.post_attention_layernorm.weight"] = 1 + _w(rng, d)
        for name, rows in (("q_proj", heads * dh), ("k_proj", kv * dh), ("v_proj", kv * dh)):
            t[f"{h}.self_attn.{name}.weight"] = _w(rng, rows, d, scale=0.3)
            if arch in ("qwen2", "qwen2_moe"):
                t[f"{h}.self_attn.{name}.bias"] = _w(rng, rows)
        t[f"{h}.self_attn.o_proj.weight"] = _w(rng, d, heads * dh)
        moe = arch in ("mixtral", "qwen2_moe") or (arch in ("ernie4_5_moe", "glm4_moe") and i >= 1)
        if not moe:
            t[f"{h}.mlp.gate_proj.weight"] = _w(rng, ff, d)
            t[f"{h}.mlp.up_proj.weight"] = _w(rng, ff, d)
            t[f"{h}.mlp.down_proj.weight"] = _w(rng, d, ff)
            continue
        block, names = ("block_sparse_moe", ("w1", "w3", "w2")) if arch == "mixtral" else \
            ("mlp", ("gate_proj", "up_proj", "down_proj"))
        t[f"{h}.{block}.gate.weight"] = _w(rng, experts, d, scale=1.0)
        for e in range(experts):
            t[f"{h}.{block}.experts.{e}.{names[0]}.weight"] = _w(rng, moe_ff, d)
            t[f"{h}.{block}.experts.{e}.{names[1]}.weight"] = _w(rng, moe_ff, d)
            t[f"{h}.{block}.experts.{e}.{names[2]}.weight"] = _w(rng, d, moe_ff)
        if arch == "qwen2_moe":
            s = cfg["shared_expert_intermediate_size"]
            t[f"{h}.mlp.shared_expert.gate_proj.weight"] = _w(rng, s, d)
            t[f"{h}.mlp.shared_expert.up_proj.weight"] = _w(rng, s, d)
            # A shared expert with a constant gate (zero weight: sigmoid = 1/2), or one that adds nothing.
            t[f"{h}.mlp.shared_expert.down_proj.weight"] = _w(rng, d, s) if shared else mx.zeros((d, s))
            t[f"{h}.mlp.shared_expert_gate.weight"] = mx.zeros((1, d)) if shared else _w(rng, 1, d)
        if arch in ("ernie4_5_moe", "glm4_moe") and (shared or arch == "glm4_moe"):
            s = max(shared, 1) * moe_ff
            t[f"{h}.mlp.shared_experts.gate_proj.weight"] = _w(rng, s, d)
            t[f"{h}.mlp.shared_experts.up_proj.weight"] = _w(rng, s, d)
            t[f"{h}.mlp.shared_experts.down_proj.weight"] = _w(rng, d, s) if shared else mx.zeros((d, s))
        if arch == "ernie4_5_moe":
            t[f"{h}.mlp.moe_statics.e_score_correction_bias"] = mx.zeros((1, experts))
        if arch == "glm4_moe":  # a real selection bias: it changes which experts are chosen
            t[f"{h}.mlp.gate.e_score_correction_bias"] = _w(rng, experts, scale=0.5)
    mx.save_safetensors(str(path / "model.safetensors"), t, metadata={"format": "pt"})
    hf_tokenizer_files(path)
    return path


def random_checkpoint(path, seed=1, tokenizer=None, **over):
    """A tinymoe run directory holding a random model (debug preset sizes plus `over`)."""
    from mlx.utils import tree_flatten

    from tinymoe.interop.import_hf import write_checkpoint
    from tinymoe.nn.model import Model
    from tinymoe.tokenizers.builtin import ByteTokenizer

    cfg = dataclasses.replace(load_preset("debug")[0], **over)
    tokenizer = tokenizer or ByteTokenizer()
    cfg.vocab_size = tokenizer.vocab_size
    mx.random.seed(seed)
    model = Model(cfg)
    weights = dict(tree_flatten(model.parameters()))
    # Router state that starts at zero (selection bias, temperature, noise weights) gets random
    # values, so the export has to carry (or correctly ignore) it.
    rng = np.random.default_rng(seed)
    for name in [k for k in weights if k.endswith(("selection_bias", "log_temperature", "w_noise"))]:
        weights[name] = mx.array((rng.standard_normal(weights[name].shape) * 0.5).astype(np.float32))
    mx.eval(weights)
    write_checkpoint(path, cfg, weights, tokenizer, {"kind": "test"})
    return cfg, weights


def logits_of(cfg, weights, tokens):
    from tinymoe.interop.export import tinymoe_logits
    from tinymoe.interop.upcycle import build_model

    return tinymoe_logits(build_model(cfg, weights), tokens)


def mlx_lm_logits(path, tokens):
    mlx_lm = pytest.importorskip("mlx_lm")
    model, _ = mlx_lm.load(str(path))
    return model(tokens).astype(mx.float32)


def diff(a, b):
    return float(mx.max(mx.abs(a - b)).item())


def tokens_for(vocab, seed=3):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, size=(2, 40)).astype(np.int32))


# ----------------------------------------------------------------------------- import


IMPORT_CASES = {"llama": ("llama", 0), "qwen2": ("qwen2", 0), "mixtral": ("mixtral", 0),
                "qwen2_moe": ("qwen2_moe", 0), "qwen2_moe+shared": ("qwen2_moe", 1),
                "ernie4_5_moe": ("ernie4_5_moe", 0), "ernie4_5_moe+shared": ("ernie4_5_moe", 2),
                "glm4_moe": ("glm4_moe", 0), "glm4_moe+shared": ("glm4_moe", 1)}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_matches_mlx_lm(tmp_path, case):
    pytest.importorskip("mlx_lm")
    from tinymoe.interop.import_hf import load_hf

    arch, shared = IMPORT_CASES[case]
    src = build_hf_dir(tmp_path / arch, arch, tie=(arch == "qwen2"), shared=shared)
    loaded = load_hf(src)
    cfg = loaded["cfg"]
    tokens = tokens_for(cfg.vocab_size)
    d = diff(logits_of(cfg, loaded["weights"], tokens), mlx_lm_logits(src, tokens))
    print(f"import {case}: max |logit diff| vs mlx-lm = {d:.3g}")
    assert d < TOL
    assert cfg.is_moe == (arch not in ("llama", "qwen2"))
    assert cfg.attn_bias == (arch in ("qwen2", "qwen2_moe"))  # random biases are kept
    assert cfg.shared_experts == shared  # zero shared experts are dropped
    if arch in ("ernie4_5_moe", "glm4_moe"):
        assert (cfg.moe_first_dense, cfg.moe_every) == (1, 1) and cfg.router_norm
    if arch == "qwen2_moe":
        assert not cfg.router_norm
    if arch == "glm4_moe":
        assert cfg.router == "sigmoid-bias"
        assert not mx.array_equal(loaded["weights"]["blocks.1.moe.router.selection_bias"], mx.zeros((4,))).item()
    # The tokenizer came along and encodes exactly as the file it came from.
    from tokenizers import Tokenizer

    text = "the lazy routers, hello world"
    assert loaded["tokenizer"].kind == "hf"
    assert loaded["tokenizer"].encode(text) == Tokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids


def test_import_comparison_detects_a_wrong_rope_layout(tmp_path):
    """Negative control: skipping ERNIE's RoPE row permutation must show up as a large difference."""
    pytest.importorskip("mlx_lm")
    from tinymoe.interop.hf_weights import _permute_heads, rope_permutation
    from tinymoe.interop.import_hf import load_hf

    src = build_hf_dir(tmp_path / "ernie", "ernie4_5_moe")
    loaded = load_hf(src)
    cfg, weights = loaded["cfg"], dict(loaded["weights"])
    for k in [k for k in weights if ".attn.wq." in k or ".attn.wk." in k]:
        weights[k] = _permute_heads(weights[k], cfg.head_dim, rope_permutation(cfg.head_dim))
    tokens = tokens_for(cfg.vocab_size)
    assert diff(logits_of(cfg, weights, tokens), mlx_lm_logits(src, tokens)) > 1e-2


def test_import_comparison_detects_a_dropped_selection_bias(tmp_path):
    """Negative control: GLM's e_score_correction_bias changes which experts run."""
    pytest.importorskip("mlx_lm")
    from tinymoe.interop.import_hf import load_hf

    src = build_hf_dir(tmp_path / "glm", "glm4_moe")
    loaded = load_hf(src)
    cfg, weights = loaded["cfg"], dict(loaded["weights"])
    for k in [k for k in weights if k.endswith("selection_bias")]:
        weights[k] = mx.zeros_like(weights[k])
    tokens = tokens_for(cfg.vocab_size)
    assert diff(logits_of(cfg, weights, tokens), mlx_lm_logits(src, tokens)) > 1e-2


def test_import_refusals(tmp_path):
    from tinymoe.interop.import_hf import load_hf

    src = build_hf_dir(tmp_path / "olmoe", "mixtral")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "olmoe"}))
    with pytest.raises(TinyMoeError, match="model_type 'olmoe' is not supported"):
        load_hf(src)
    (src / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(TinyMoeError, match="rope_scaling"):
        load_hf(src)
    # A shared expert behind an input-dependent gate is not tinymoe's ungated one.
    q = build_hf_dir(tmp_path / "q", "qwen2_moe", shared=1)
    t = mx.load(str(q / "model.safetensors"))
    t["model.layers.1.mlp.shared_expert_gate.weight"] = mx.ones((1, 32))
    mx.save_safetensors(str(q / "model.safetensors"), t)
    with pytest.raises(TinyMoeError, match="input-dependent sigmoid gate"):
        load_hf(q)
    g = build_hf_dir(tmp_path / "g", "glm4_moe")
    gcfg = json.loads((g / "config.json").read_text())
    (g / "config.json").write_text(json.dumps({**gcfg, "routed_scaling_factor": 2.5}))
    with pytest.raises(TinyMoeError, match="routed_scaling_factor"):
        load_hf(g)
    with pytest.raises(TinyMoeError, match="config.json: missing"):
        load_hf(tmp_path)


# ----------------------------------------------------------------------------- export


EXPORT_CASES = {  # case -> (expected architecture, model settings over the debug preset)
    "mixtral": ("mixtral", {}),
    "ernie4_5_moe": ("ernie4_5_moe", {"n_layers": 4, "moe_every": 2}),
    "ernie4_5_moe+shared": ("ernie4_5_moe", {"moe_first_dense": 1, "shared_experts": 2}),
    "qwen2_moe": ("qwen2_moe", {"router_norm": False, "tie_embeddings": False}),
    "qwen2_moe+shared": ("qwen2_moe", {"router_norm": False, "shared_experts": 1, "attn_bias": True}),
    "glm4_moe": ("glm4_moe", {"router": "sigmoid-bias", "n_layers": 3, "moe_first_dense": 1, "shared_experts": 1}),
    "glm4_moe-norm": ("glm4_moe", {"router": "sigmoid-bias", "router_norm": False, "attn_bias": True}),
    "llama": ("llama", {"moe_experts": 1, "moe_topk": 1}),
    "qwen2": ("qwen2", {"moe_experts": 1, "moe_topk": 1, "attn_bias": True}),
}
# Routers whose inference is one of the above: exported by function, imported back as plain
# topk (so equal logits, not an equal config).
EQUIVALENT_ROUTERS = {
    "smart": ("mixtral", {"router": "smart"}),  # learned temperature folded into the weight
    "noisy": ("mixtral", {"router": "noisy"}),  # noise only while training
    "jitter": ("mixtral", {"router": "jitter", "router_order": "topk-softmax"}),
    "switch": ("qwen2_moe", {"router": "switch", "moe_topk": 1}),  # top-1, gate = probability
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_matches_mlx_lm_and_round_trips(tmp_path, case):
    pytest.importorskip("mlx_lm")
    from tinymoe.interop.export import export_hf
    from tinymoe.interop.import_hf import load_hf

    arch, over = EXPORT_CASES[case]
    cfg, weights = random_checkpoint(tmp_path / "ckpt", **over)
    report = export_hf(str(tmp_path / "ckpt"), tmp_path / "hf", check=False)
    assert report["architecture"] == arch and report["tokenizer_matches"] is True
    tokens = tokens_for(cfg.vocab_size)
    d = diff(logits_of(cfg, weights, tokens), mlx_lm_logits(tmp_path / "hf", tokens))
    print(f"export {case}: max |logit diff| vs mlx-lm = {d:.3g}")
    assert d < TOL
    transformers = pytest.importorskip("transformers")  # config parsing needs no PyTorch
    hf_cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"))
    assert hf_cfg.model_type == arch and hf_cfg.num_hidden_layers == cfg.n_layers
    assert hf_cfg.rope_parameters["rope_theta"] == cfg.rope_theta
    if arch == "ernie4_5_moe":  # transformers' own placement rule gives tinymoe's MoE layers
        assert [(i + 1) % hf_cfg.moe_layer_interval == 0 and hf_cfg.moe_layer_start_index <= i
                <= hf_cfg.moe_layer_end_index for i in range(cfg.n_layers)] == \
            [cfg.layer_is_moe(i) for i in range(cfg.n_layers)]
    back = load_hf(tmp_path / "hf")
    assert back["cfg"] == cfg and back["tokenizer"].kind == "bytes"
    assert set(back["weights"]) == set(weights)
    for name, w in weights.items():
        assert back["weights"][name].dtype == w.dtype
        assert mx.array_equal(back["weights"][name], w).item(), name  # bit-exact


@pytest.mark.parametrize("router", list(EQUIVALENT_ROUTERS))
def test_routers_with_equal_inference_export(tmp_path, router):
    pytest.importorskip("mlx_lm")
    from tinymoe.interop.export import export_hf
    from tinymoe.interop.import_hf import load_hf

    arch, over = EQUIVALENT_ROUTERS[router]
    cfg, weights = random_checkpoint(tmp_path / "ckpt", **over)
    assert export_hf(str(tmp_path / "ckpt"), tmp_path / "hf", check=False)["architecture"] == arch
    tokens = tokens_for(cfg.vocab_size)
    ours = logits_of(cfg, weights, tokens)
    d = diff(ours, mlx_lm_logits(tmp_path / "hf", tokens))
    print(f"export {router} router: max |logit diff| vs mlx-lm = {d:.3g}")
    assert d < TOL
    back = load_hf(tmp_path / "hf")
    assert back["cfg"].router == "topk" and diff(logits_of(back["cfg"], back["weights"], tokens), ours) < TOL


def test_export_refuses_what_no_architecture_matches(tmp_path):
    from tinymoe.interop.hf_config import choose_arch

    base = dataclasses.replace(load_preset("debug")[0], n_layers=4)
    with pytest.raises(TinyMoeError, match="no Hugging Face architecture matches"):
        choose_arch(dataclasses.replace(base, router_norm=False, moe_first_dense=1))
    with pytest.raises(TinyMoeError, match="mixtral has an MoE FFN in every layer"):
        choose_arch(dataclasses.replace(base, moe_every=2), "mixtral")
    with pytest.raises(TinyMoeError, match="router 'expert-choice' cannot be exported"):
        choose_arch(dataclasses.replace(base, router="expert-choice"))
    with pytest.raises(TinyMoeError, match="router 'dynamic' cannot be exported"):
        choose_arch(dataclasses.replace(base, router="dynamic"))
    with pytest.raises(TinyMoeError, match="group-limited routing"):
        choose_arch(dataclasses.replace(base, router="sigmoid-bias", router_groups=2))
    with pytest.raises(TinyMoeError, match="eval_capacity_factor"):
        choose_arch(dataclasses.replace(base, eval_capacity_factor=1.25))
    with pytest.raises(TinyMoeError, match="mixtral has no shared experts"):
        choose_arch(dataclasses.replace(base, shared_experts=1), "mixtral")
    odd = dataclasses.replace(base)
    odd.router = "some-future-router"  # a router without an entry in the mapping table
    with pytest.raises(TinyMoeError, match="no Hugging Face architecture mapping"):
        choose_arch(odd)
    assert choose_arch(base) == "mixtral"
    assert choose_arch(dataclasses.replace(base, moe_first_dense=1)) == "ernie4_5_moe"
    assert choose_arch(dataclasses.replace(base, router="sigmoid-bias")) == "glm4_moe"
    assert choose_arch(dataclasses.replace(base, capacity_factor=1.25)) == "mixtral"  # training only


def test_transformers_loads_the_export_with_equal_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tinymoe.interop.export import export_hf

    for arch, over in list(EXPORT_CASES.values()) + list(EQUIVALENT_ROUTERS.values()):
        cfg, weights = random_checkpoint(tmp_path / arch / "ckpt", **over)
        export_hf(str(tmp_path / arch / "ckpt"), tmp_path / arch / "hf", check=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / arch / "hf"),
                                                                  torch_dtype=torch.float32)
        tokens = tokens_for(cfg.vocab_size)
        with torch.no_grad():
            theirs = model(torch.tensor(np.array(tokens), dtype=torch.long)).logits.numpy()
        ours = np.array(logits_of(cfg, weights, tokens))
        assert np.max(np.abs(ours - theirs)) < TOL, arch


def test_model_config_field_default_is_backward_compatible():
    # Old manifests have no attn_bias: the default keeps their meaning (no biases).
    assert ModelConfig().attn_bias is False
