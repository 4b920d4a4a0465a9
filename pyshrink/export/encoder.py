"""BERT-style encoder graphs: ``input_ids``, ``attention_mask``, ``token_type_ids`` -> ``last_hidden_state``.

Post-LayerNorm blocks with the residual add fused into ``SkipLayerNormalization``; bidirectional attention in
plain ONNX operators with an additive padding mask; every layer its own head count and MLP width.
"""
from __future__ import annotations

import numpy as np
import torch

from ..arch import adapter_for, get_path
from ..errors import InvalidSetting
from .graph import FLOAT, INT64, MS, Graph, to_numpy
from .spec import _act, _norm
from .weights import WeightPolicy, concat, emit


def build_encoder(model, policy: WeightPolicy, *, opset: int, accuracy_level: int) -> tuple[Graph, dict]:
    adapter = adapter_for(model)
    cfg = model.config
    if adapter.name != "bert":
        raise InvalidSetting(f"no encoder exporter for family {adapter.name!r}")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise InvalidSetting("only absolute position embeddings are exportable for BERT")
    base = model.base_model
    if base is not model:
        raise InvalidSetting(f"the encoder export builds BERT's hidden states (and pooler); {type(model).__name__} "
                             "adds a task head it does not build: export model.base_model")
    g = Graph("pyshrink_bert_encoder", opset)
    D = adapter.head_dim(cfg)
    act = _act(cfg.hidden_act)
    ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
    mask = g.input("attention_mask", INT64, ["batch_size", "sequence_length"])
    types = g.input("token_type_ids", INT64, ["batch_size", "sequence_length"])

    emb = base.embeddings
    rows = ids
    if hasattr(emb.word_embeddings, "row_of_id"):  # contracted vocabulary: tokenizer id -> kept row, as in PyTorch
        remap = to_numpy(emb.word_embeddings.row_of_id).astype(np.int64)
        rows = g.node("Gather", [g.initializer("vocab_remap", remap), ids], "emb/Remap", axis=0)
    h = g.node("Gather", [g.initializer("word_embeddings", to_numpy(emb.word_embeddings.weight.float())), rows],
               "emb/word")
    seq = g.node("Shape", [ids], "emb/SeqLen", start=1, end=2)
    pe = g.node("Slice", [g.initializer("position_embeddings", to_numpy(emb.position_embeddings.weight.float())),
                          g.const([0]), seq, g.const([0])], "emb/pos")  # positions 0..S-1
    te = g.node("Gather", [g.initializer("token_type_embeddings", to_numpy(emb.token_type_embeddings.weight.float())), types],
                "emb/type")
    h = g.node("Add", [g.node("Add", [h, pe], "emb/add_pos"), te], "emb/add_type")
    n = _norm(emb.LayerNorm)
    h = g.node("LayerNormalization", [h, g.initializer("emb_ln.weight", to_numpy(n.weight)),
                                      g.initializer("emb_ln.bias", to_numpy(n.bias))], "emb/LN", axis=-1, epsilon=n.eps)
    # additive mask [B, 1, 1, S]: 0 where attended, float32 min where padded (as transformers does)
    fmask = g.node("Cast", [mask], "mask/Cast", to=FLOAT)
    bias = g.node("Mul", [g.node("Sub", [g.const(1.0, np.float32), fmask], "mask/Inv"),
                          g.const(float(np.finfo(np.float32).min), np.float32)], "mask/Bias")
    bias = g.node("Unsqueeze", [bias, g.const([1, 2])], "mask/Unsqueeze")

    for i, block in enumerate(adapter.blocks(model)):
        name = f"layers.{i}"
        projs = [policy.proj(get_path(block, p)) for p in (adapter.q, adapter.k, adapter.v)]
        H = projs[0].N // D
        fused = concat(projs)
        if fused is not None:
            q, k, v = g.node("Split", [emit(g, h, fused, f"{name}.qkv", accuracy_level), g.const([p.N for p in projs])],
                             f"{name}/SplitQKV", n_out=3, axis=-1)
        else:
            q, k, v = [emit(g, h, p, f"{name}.{c}", accuracy_level) for p, c in zip(projs, "qkv")]
        heads = [g.node("Transpose", [g.node("Reshape", [t, g.const([0, 0, H, D])], f"{name}/{c}/Reshape")],
                        f"{name}/{c}/Transpose", perm=[0, 2, 1, 3]) for t, c in zip((q, k, v), "qkv")]
        kt = g.node("Transpose", [heads[1]], f"{name}/kT", perm=[0, 1, 3, 2])
        scores = g.node("Mul", [g.node("MatMul", [heads[0], kt], f"{name}/QK"), g.const(D ** -0.5, np.float32)],
                        f"{name}/Scale")
        probs = g.node("Softmax", [g.node("Add", [scores, bias], f"{name}/Mask")], f"{name}/Softmax", axis=-1)
        ctx = g.node("MatMul", [probs, heads[2]], f"{name}/PV")
        ctx = g.node("Reshape", [g.node("Transpose", [ctx], f"{name}/ctxT", perm=[0, 2, 1, 3]), g.const([0, 0, H * D])],
                     f"{name}/ctx")
        a = emit(g, ctx, policy.proj(get_path(block, adapter.o)), f"{name}.o", accuracy_level)
        h = _skip_ln(g, a, h, _norm(block.attention.output.LayerNorm), f"{name}.attn_ln")
        y = emit(g, h, policy.proj(adapter.mlp_in_modules(block)[0]), f"{name}.fc_in", accuracy_level)
        if act == "relu":
            y = g.node("Relu", [y], f"{name}/act")
        else:
            y = g.node({"gelu": "Gelu", "gelu_tanh": "FastGelu"}[act], [y], f"{name}/act", domain=MS)
        y = emit(g, y, policy.proj(adapter.mlp_out_module(block)), f"{name}.fc_out", accuracy_level)
        h = _skip_ln(g, y, h, _norm(block.output.LayerNorm), f"{name}.out_ln")

    g.node("Identity", [h], "out/Identity", outputs=["last_hidden_state"])
    g.output("last_hidden_state", FLOAT, ["batch_size", "sequence_length", int(emb.word_embeddings.weight.shape[1])])
    outputs = ["last_hidden_state"]
    pooler = getattr(base, "pooler", None)
    if pooler is not None:
        first = g.node("Gather", [h, g.const(0)], "pooler/First", axis=1)
        p = g.node("Tanh", [emit(g, first, policy.proj(pooler.dense), "pooler.dense", accuracy_level)], "pooler/Tanh")
        g.node("Identity", [p], "pooler/Identity", outputs=["pooler_output"])
        g.output("pooler_output", FLOAT, ["batch_size", int(pooler.dense.weight.shape[0])])
        outputs.append("pooler_output")
    return g, {"outputs": outputs}


def _skip_ln(g: Graph, x: str, residual: str, n, name: str) -> str:
    outs = g.node("SkipLayerNormalization", [x, residual, g.initializer(f"{name}.weight", to_numpy(n.weight)),
                                             g.initializer(f"{name}.bias", to_numpy(n.bias))],
                  f"{name}/SkipLN", n_out=4, domain=MS, epsilon=n.eps)
    return outs[0]


@torch.no_grad()
def reference_outputs(model, ids, mask, types) -> dict:
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    res = {"last_hidden_state": out.last_hidden_state.float().numpy()}
    if getattr(out, "pooler_output", None) is not None:
        res["pooler_output"] = out.pooler_output.float().numpy()
    return res
