"""Decoder graphs on ONNX Runtime's fused operators, one layer at a time (each with its own widths and heads).

Interface (the names ONNX Runtime GenAI's model builder uses, so its generator runs the model as-is):

* inputs ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, past+seq],
  ``past_key_values.{i}.key|value`` float32 [batch, kv_heads_i, past, head_dim];
* outputs ``logits`` float32 [batch, 1, vocab] (last position only, unless exported with
  ``logits="all"``), ``present.{i}.key|value`` float32 [batch, kv_heads_i, past+seq, head_dim].

The past and present buffers may be the same memory ([batch, kv_heads, max_length, head_dim]): then
``GroupQueryAttention`` appends in place and a decode step copies nothing (ORT GenAI's
``past_present_share_buffer``; pyshrink's runtime does the same through IOBinding).

Per layer: RMS or layer norm (residual adds fused into ``SkipSimplifiedLayerNormalization`` /
``SkipLayerNormalization``; the first block's RMS norm in standard ops, which ORT fuses) -> one q|k|v
projection -> ``GroupQueryAttention`` (rotary inside for RoPE families) -> output projection -> MLP (gate|up
fused into one projection). 4-bit weights are ``MatMulNBits``.
"""
from __future__ import annotations

import numpy as np

from .graph import FLOAT, INT32, INT64, MS, Graph, to_numpy
from .spec import DecoderSpec, Norm
from .weights import concat, emit, initializers

INT64_MAX = np.iinfo(np.int64).max


def kv_names(i: int) -> tuple[str, str, str, str]:
    return (f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value")


class _Builder:
    def __init__(self, spec: DecoderSpec, *, opset: int, accuracy_level: int, logits: str):
        self.s = spec
        self.g = Graph(f"pyshrink_{spec.family}_decoder", opset)
        self.acc = accuracy_level
        self.logits = logits

    # ---- norms ---------------------------------------------------------------------------------------
    def _norm_inputs(self, n: Norm, name: str, with_bias: bool):
        ins = [self.g.initializer(f"{name}.weight", to_numpy(n.weight))]
        if with_bias:
            b = n.bias if n.bias is not None else n.weight.new_zeros(n.weight.shape)
            ins.append(self.g.initializer(f"{name}.bias", to_numpy(b)))
        return ins

    def norm(self, x: str, n: Norm, name: str) -> str:
        g = self.g
        if self.s.norm == "rms":
            # Standard ops: ORT's SimplifiedLayerNormalization sits in the ONNX domain without being an ONNX op,
            # so onnx.checker refused the whole graph (and ORT refuses it under com.microsoft). This is the only
            # stand-alone norm (the first block's input; every later one is fused with its residual add), in the
            # Pow-ReduceMean-Add-Sqrt-Div-Mul form that ORT's optimizer fuses back into that op.
            sq = g.node("Pow", [x, g.const(2.0, np.float32)], f"{name}/Pow")
            axes = {"axes": [-1]} if g.opset < 18 else {}  # an input from opset 18 on
            mean_sq = g.node("ReduceMean", [sq] + ([g.const([-1])] if g.opset >= 18 else []), f"{name}/ReduceMean",
                             keepdims=1, **axes)
            rms = g.node("Sqrt", [g.node("Add", [mean_sq, g.const(n.eps, np.float32)], f"{name}/AddEps")],
                         f"{name}/Sqrt")
            return g.node("Mul", [g.node("Div", [x, rms], f"{name}/Div"), *self._norm_inputs(n, name, False)],
                          f"{name}/MulWeight")
        return g.node("LayerNormalization", [x, *self._norm_inputs(n, name, True)], f"{name}/LN",
                      axis=-1, epsilon=n.eps, stash_type=1)

    def skip_norm(self, x: str, residual: str, n: Norm, name: str) -> tuple[str, str]:
        """(norm(x + residual), x + residual) in one fused node."""
        g = self.g
        if self.s.norm == "rms":
            outs = g.node("SkipSimplifiedLayerNormalization", [x, residual, *self._norm_inputs(n, name, False)],
                          f"{name}/SkipSLN", n_out=4, domain=MS, epsilon=n.eps)
        else:
            outs = g.node("SkipLayerNormalization", [x, residual, *self._norm_inputs(n, name, True)],
                          f"{name}/SkipLN", n_out=4, domain=MS, epsilon=n.eps)
        return outs[0], outs[3]

    # ---- blocks --------------------------------------------------------------------------------------
    def act(self, x: str, name: str) -> str:
        g, a = self.g, self.s.act
        if a == "silu":
            return g.node("Mul", [x, g.node("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")
        if a == "gelu_tanh":
            return g.node("FastGelu", [x], f"{name}/FastGelu", domain=MS)
        if a == "gelu":
            return g.node("Gelu", [x], f"{name}/Gelu", domain=MS)
        return g.node("Relu", [x], f"{name}/Relu")

    def projections(self, x: str, projs: list, name: str, parts: list[str]) -> list[str]:
        """Run projections that read ``x``; fused into one (then Split) when their weights allow."""
        fused = concat(projs) if len(projs) > 1 else projs[0]
        if fused is None:
            return [emit(self.g, x, p, f"{name}.{part}", self.acc) for p, part in zip(projs, parts)]
        y = emit(self.g, x, fused, f"{name}.{'_'.join(parts)}", self.acc)
        if len(projs) == 1:
            return [y]
        return self.g.node("Split", [y, self.g.const([p.N for p in projs])], f"{name}/Split", n_out=len(projs), axis=-1)

    def last(self, x: str, name: str) -> str:
        """Each row's last real new position of ``x [batch, seq, hidden]``, as ``[batch, 1, hidden]``."""
        g = self.g
        picked = g.node("GatherND", [x, self.last_index], f"{name}/GatherND", batch_dims=1)
        return g.node("Unsqueeze", [picked, g.const([1])], f"{name}/Unsqueeze")

    def last_positions(self, ids: str, mask: str) -> str:
        """Per row, the index among the new tokens of its last real one, ``[batch, 1]``: min(new tokens, tokens
        the mask keeps) - 1. Batches are right-padded (GroupQueryAttention's seqlens_k counts each row's tokens
        from the left), so a shorter prompt's last token is not the last column, whose logits were a pad's. A
        row whose new tokens are all real (batch 1, and every step) gets the last column, also when the mask
        spans a whole preallocated cache (ONNX Runtime GenAI's static masks)."""
        g = self.g
        seq = g.node("Shape", [ids], "last/SeqLen", start=1, end=2)
        kept = g.node("ReduceSum", [mask, g.const([1])], "last/Kept", keepdims=1)
        count = g.node("Min", [kept, seq], "last/Count")
        return g.node("Max", [g.node("Sub", [count, g.const(1)], "last/Sub"), g.const(0)], "last/Index")

    def attention(self, i: int, x: str, last_only: bool = False) -> str:
        s, g = self.s, self.g
        layer = s.layers[i]
        name = f"layers.{i}.attn"
        D = s.head_dim
        fused = layer.qkv[0] if len(layer.qkv) == 1 else concat(layer.qkv)  # GPT-2's c_attn is fused already
        if fused is not None:
            qkv = [emit(g, x, fused, f"{name}.qkv", self.acc), "", ""]
        else:
            qkv = [emit(g, x, p, f"{name}.{n}", self.acc) for p, n in zip(layer.qkv, "qkv")]
        rot = []
        if s.rotary is not None and self.fused_rotary:
            rot = [self.cos, self.sin]
        elif s.rotary is not None:  # rotary too narrow for the fused kernel: rotate q and k here
            if not qkv[1]:
                sizes = [layer.num_heads * D, layer.num_kv_heads * D, layer.num_kv_heads * D]
                qkv = g.node("Split", [qkv[0], g.const(sizes)], f"{name}/SplitQKV", n_out=3, axis=-1)
            qkv = [self.rotate(qkv[0], layer.num_heads, f"{name}/rope_q"),
                   self.rotate(qkv[1], layer.num_kv_heads, f"{name}/rope_k"), qkv[2]]
        past_k, past_v, present_k, present_v = kv_names(i)
        for nm in (past_k, past_v):
            g.input(nm, FLOAT, ["batch_size", layer.num_kv_heads, "past_sequence_length", D])
        for nm in (present_k, present_v):
            g.output(nm, FLOAT, ["batch_size", layer.num_kv_heads, "total_sequence_length", D])
        # sliding-window layers: ONNX Runtime's local_window_size counts as transformers' sliding_window does (on the
        # CPU provider, a tiny Mistral with a 16-token window matched over a 150-token prompt and 49 steps; window - 1
        # did not; the CUDA provider's count was not checked)
        local = {"local_window_size": layer.window} if layer.window else {}
        out = g.node(
            "GroupQueryAttention", [*qkv, past_k, past_v, self.seqlens_k, self.total_len, *rot],
            f"{name}/GQA", domain=MS, outputs=[f"{name}/GQA/out", present_k, present_v],
            num_heads=layer.num_heads, kv_num_heads=layer.num_kv_heads, scale=float(layer.scale),
            do_rotary=int(bool(rot)), rotary_interleaved=0, **local,
        )[0]
        if last_only:  # the last layer feeds only the last position onward (its keys/values are all cached)
            out = self.last(out, f"{name}/last_position")
        return emit(g, out, layer.o, f"{name}.o", self.acc)

    def rotate(self, x: str, heads: int, name: str) -> str:
        """Rotary embedding (rotate-half form, first ``rot`` dims of each head) in plain ONNX operators."""
        g, D = self.g, self.s.head_dim
        half = self.s.rotary[0].shape[1]
        x4 = g.node("Reshape", [x, g.const([0, 0, heads, D])], f"{name}/Reshape")
        x1, x2, rest = g.node("Split", [x4, g.const([half, half, D - 2 * half])], f"{name}/Split", n_out=3, axis=-1)
        a = g.node("Sub", [g.node("Mul", [x1, self.rope_cos], f"{name}/x1cos"),
                           g.node("Mul", [x2, self.rope_sin], f"{name}/x2sin")], f"{name}/a")
        b = g.node("Add", [g.node("Mul", [x2, self.rope_cos], f"{name}/x2cos"),
                           g.node("Mul", [x1, self.rope_sin], f"{name}/x1sin")], f"{name}/b")
        y = g.node("Concat", [a, b, rest], f"{name}/Concat", axis=-1)
        return g.node("Reshape", [y, g.const([0, 0, heads * D])], f"{name}/ReshapeBack")

    def positions(self, ids: str, mask: str) -> str:
        """Position of each new token: (number of attended tokens up to it) - 1, from the attention mask."""
        g = self.g
        pos = g.node("Sub", [g.node("CumSum", [mask, g.const(1)], "pos/CumSum"), g.const(1)], "pos/Sub")
        pos = g.node("Max", [pos, g.const(0)], "pos/Max")
        seq = g.node("Shape", [ids], "pos/SeqLen", start=1, end=2)
        return g.node("Slice", [pos, g.node("Neg", [seq], "pos/Neg"), g.const([INT64_MAX]), g.const([1])], "pos/Slice")

    def mlp(self, i: int, x: str) -> str:
        s = self.s
        layer = s.layers[i]
        name = f"layers.{i}.mlp"
        if s.gated:
            gate, up = self.projections(x, layer.mlp_in, name, ["gate", "up"])
            h = self.g.node("Mul", [self.act(gate, f"{name}/act"), up], f"{name}/gate_mul")
        else:
            h = self.act(self.projections(x, layer.mlp_in, name, ["fc_in"])[0], f"{name}/act")
        return emit(self.g, h, layer.mlp_out, f"{name}.out", self.acc)

    # ---- graph ---------------------------------------------------------------------------------------
    def embedding(self, ids: str) -> str:
        s, g = self.s, self.g
        head = s.head
        if s.extra.get("vocab_remap") is not None:  # contracted vocabulary: tokenizer id -> kept row
            remap = to_numpy(s.extra["vocab_remap"]).astype(np.int64)
            ids = g.node("Gather", [g.initializer("vocab_remap", remap), ids], "embed/Remap", axis=0)
        q = s.extra.get("embedding_q4")
        if q is not None:
            # 4-bit rows read by GatherBlockQuantized: the head's own bytes when tied (as ORT GenAI does), else
            # the embedding's; rows are padded to whole groups, so gather the padded row and cut it back to K
            names = self.head_weight_names if q is head else initializers(g, q, "embed_tokens")
            nb = -(-q.K // q.group_size)
            flat = g.node("Reshape", [names[0], g.const([q.N, nb * q.group_size // 2])], "embed/Reshape")
            scales = g.node("Reshape", [names[1], g.const([q.N, nb])], "embed/ScalesReshape")
            ins = [flat, ids, scales]
            if len(names) > 2:
                ins.append(g.node("Reshape", [names[2], g.const([q.N, -1])], "embed/ZpReshape"))
            h = g.node("GatherBlockQuantized", ins, "embed/GatherBlockQuantized", domain=MS, bits=4,
                       block_size=q.group_size, gather_axis=0, quantize_axis=1)
            if nb * q.group_size != q.K:
                h = g.node("Slice", [h, g.const([0]), g.const([q.K]), g.const([-1])], "embed/Unpad")
            return h
        return g.node("Gather", [g.initializer("embed_tokens.weight", to_numpy(s.embed)), ids], "embed/Gather")

    def build(self):
        s, g = self.s, self.g
        ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
        mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
        # GroupQueryAttention's view of the mask: tokens so far - 1 per row, and the total length
        summed = g.node("ReduceSum", [mask, g.const([1])], "mask/ReduceSum", keepdims=0)
        self.seqlens_k = g.node("Cast", [g.node("Sub", [summed, g.const(1)], "mask/Sub")], "mask/seqlens_k", to=INT32)
        total = g.node("Gather", [g.node("Shape", [mask], "mask/Shape"), g.const(1)], "mask/Gather", axis=0)
        self.total_len = g.node("Cast", [total], "mask/total_len", to=INT32)
        if self.logits == "last":
            self.last_index = self.last_positions(ids, mask)
        if s.rotary is not None:
            self.cos = g.initializer("cos_cache", to_numpy(s.rotary[0]))
            self.sin = g.initializer("sin_cache", to_numpy(s.rotary[1]))
            half = s.rotary[0].shape[1]
            # GroupQueryAttention rotates inside when the rotary half-width is a multiple of 8 and the head size one
            # of 16 (ONNX Runtime refuses other head sizes with do_rotary); otherwise plain operators rotate
            self.fused_rotary = half % 8 == 0 and 2 * half <= s.head_dim and s.head_dim % 16 == 0
            if not self.fused_rotary:
                pos = self.positions(ids, mask)
                unsq = g.const([2])
                self.rope_cos = g.node("Unsqueeze", [g.node("Gather", [self.cos, pos], "rope/cos"), unsq], "rope/cos4")
                self.rope_sin = g.node("Unsqueeze", [g.node("Gather", [self.sin, pos], "rope/sin"), unsq], "rope/sin4")

        # the head's weights first, so that a tied 4-bit embedding can point at them
        self.head_weight_names = initializers(g, s.head, "lm_head")

        h = self.embedding(ids)
        if s.positions is not None:
            table, offset = s.positions
            pos = self.positions(ids, mask)
            if offset:
                pos = g.node("Add", [pos, g.const(offset)], "pos/Offset")
            pe = g.node("Gather", [g.initializer("embed_positions.weight", to_numpy(table)), pos], "pos/Gather")
            h = g.node("Add", [h, pe], "embed/AddPositions")

        residual, x = h, self.norm(h, s.layers[0].norm_in, "layers.0.norm_in")
        for i, layer in enumerate(s.layers):
            last_only = self.logits == "last" and i + 1 == len(s.layers)
            a = self.attention(i, x, last_only)
            if last_only:
                residual = self.last(residual, f"layers.{i}/residual_last")
            if s.parallel:
                xm = self.last(x, f"layers.{i}/mlp_in_last") if last_only else x
                delta = g.node("Add", [a, self.mlp(i, xm)], f"layers.{i}/parallel_add")
            else:
                x2, residual = self.skip_norm(a, residual, layer.norm_post, f"layers.{i}.norm_post")
                delta = self.mlp(i, x2)
            if i + 1 < len(s.layers):
                x, residual = self.skip_norm(delta, residual, s.layers[i + 1].norm_in, f"layers.{i + 1}.norm_in")
            else:
                x, _ = self.skip_norm(delta, residual, s.final_norm, "final_norm")

        logits = emit(g, x, s.head, "lm_head", self.acc, weights=self.head_weight_names)
        logits = self.vocab_out(logits)
        g.node("Identity", [logits], "logits/Identity", outputs=["logits"])
        g.output("logits", FLOAT, ["batch_size", 1 if self.logits == "last" else "sequence_length",
                                   s.extra.get("full_vocab_size", s.vocab_size)])
        g.outputs.insert(0, g.outputs.pop())  # logits first, then present.{i}.key/value (GenAI's order)
        return g

    def vocab_out(self, logits: str) -> str:
        """Contracted vocabularies: spread the kept tokens' logits back over the full vocabulary (-inf elsewhere)."""
        keep = self.s.extra.get("vocab_keep")
        if keep is None:
            return logits
        g, full = self.g, self.s.extra["full_vocab_size"]
        index = np.full(full, len(keep), dtype=np.int64)  # removed tokens point at the -inf column
        index[np.asarray(keep, dtype=np.int64)] = np.arange(len(keep))
        shape = g.node("Shape", [logits], "vocab/Shape", start=0, end=2)
        col = g.node("Expand", [g.const([[[-np.inf]]], np.float32),
                                g.node("Concat", [shape, g.const([1])], "vocab/ColShape", axis=0)], "vocab/NegInf")
        padded = g.node("Concat", [logits, col], "vocab/Concat", axis=-1)
        return g.node("Gather", [padded, g.initializer("vocab_index", index)], "vocab/Gather", axis=2)


def build_decoder(spec: DecoderSpec, *, opset: int, accuracy_level: int, logits: str = "last") -> Graph:
    return _Builder(spec, opset=opset, accuracy_level=accuracy_level, logits=logits).build()
