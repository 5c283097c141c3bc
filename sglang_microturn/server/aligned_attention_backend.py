"""SGLang attention backend on the aligned split-KV kernels (microturn_kernels.aligned_attention).

A token's attention output has the same bits whether the server computed it in a one-shot prefill, in any
chunked extend (micro-turn), in a mixed batch or in decode (see the precision contract in the kernel module),
and micro-turn extends over long histories get split-KV parallelism.

Switch: `--attention-backend microturn_aligned` (registered by `install()`, which the plugin calls in every
SGLang process). With MICROTURN_ALIGNED_ATTENTION=triton, `--attention-backend triton` is served by this
backend too (for tools that only know the name "triton"; SGLang's name-based gates then see "triton").
The name is accepted by `--enable-deterministic-inference` and keeps the radix cache on.

Knobs (environment, read when the backend is built; the trainer (alignment/aligned_reference.AlignedKVCache)
reads the first three through the same `aligned_forward.attention_config`, and they must match the server's):
  MICROTURN_ATTN_SPLIT (default 256): S, keys per left-aligned split.
  MICROTURN_ATTN_BLOCK_N (default 64), MICROTURN_ATTN_BLOCK_M (default 16): inner tile shape.
  MICROTURN_ATTN_WORKSPACE_MB (default 512): cap on the fp32 split partials of one extend launch.

Why S = 256 by default: it is SGLang's own deterministic decode split tile, so the partial buffers
(attn_logits [bs, H, ctx/S, DV] fp32) have the size SGLang already accepts; it gives decode at batch 1 and a
16-token extend over 8k+ history hundreds of CTAs; the price is prefill partial traffic ~ tokens * pos / S,
which matters only for long one-shot prefills. Raise S (e.g. 1024, 4096) if long prefills dominate.

Supported: causal self-attention, MHA/GQA, bf16/fp16 KV, page size 1 (or any page size with a 3-D slot view
of the pool), decode CUDA graphs, mixed/chunked prefill, radix cache. Refused at construction or first call
with NotImplementedError: MLA, sliding window, DCP, encoder-decoder, logit soft-cap, sinks, score_mod, custom
masks (speculative verify), fp8 KV scales. Speculative decoding's draft backends are not replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from microturn_kernels.aligned_attention import aligned_decode, aligned_extend
from sglang_microturn import config
from sglang_microturn.alignment.aligned_forward import attention_config

if TYPE_CHECKING:
    from sglang.srt.model_executor.model_runner import ModelRunner

BACKEND_NAME = "microturn_aligned"


def _triton_backend_class():
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    return TritonAttnBackend


class _Unsupported(NotImplementedError):
    def __init__(self, what: str):
        super().__init__(
            f"attention backend {BACKEND_NAME!r} does not support {what}; use --attention-backend triton"
            " (or fa3/flashinfer) for this model or feature"
        )


def _make_class():
    TritonAttnBackend = _triton_backend_class()

    class AlignedTritonAttnBackend(TritonAttnBackend):
        """TritonAttnBackend whose decode and extend kernels are the aligned split-KV ones.

        Reuses all of TritonAttnBackend's metadata and KV-write code: decode goes through
        `self.decode_attention_fwd` (the SGLang attn_logits/attn_lse buffers, sized with max_kv_splits =
        cdiv(context_len, S), are our split partials, including the CUDA-graph ones), extend through the
        unified-index path (`_forward_extend_unified`, which builds prefix+new kv_indices after the new
        tokens' K/V are written) into `self.extend_attention_fwd_unified`.
        """

        def __init__(
            self,
            model_runner: ModelRunner,
            skip_prefill: bool = False,
            kv_indptr_buf: Optional[torch.Tensor] = None,
        ):
            super().__init__(model_runner, skip_prefill=skip_prefill, kv_indptr_buf=kv_indptr_buf)
            if self.use_mla:
                raise _Unsupported("MLA models")
            if self.sliding_window_size is not None and self.sliding_window_size > 0:
                raise _Unsupported("sliding-window attention")
            if self.dcp_size > 1:
                raise _Unsupported("decode context parallelism (DCP)")
            self.aligned_config = attention_config()
            self.split_tile_size = self.aligned_config.split_size
            self.max_kv_splits = self.aligned_config.max_splits(self.max_context_len)
            self.static_kv_splits = False
            # Routes forward_extend to _forward_extend_unified (one kv index list over prefix + new tokens),
            # whose kernel we replace below. Nothing else in TritonAttnBackend reads it (get_num_kv_splits is
            # overridden).
            self.enable_deterministic = True
            self.workspace_bytes = config.value(config.ATTN_WORKSPACE_MB) << 20
            self.decode_attention_fwd = torch.compiler.disable(self._aligned_decode_fwd)
            self.extend_attention_fwd_unified = torch.compiler.disable(self._aligned_extend_fwd)
            self.extend_attention_fwd = self._refuse_split_extend
            max_rows = model_runner.req_to_token_pool.size + 1
            # Decode's qo_indptr (one query per request), preallocated so graph capture sees a fixed buffer.
            self._decode_qo_indptr = torch.arange(max_rows + 1, dtype=torch.int32, device=self.device)

        def init_forward_metadata(self, forward_batch):
            super().init_forward_metadata(forward_batch)
            # Extends run eagerly: the batch's real longest sequence (known on the host) bounds the split grid
            # instead of the context length. Decode under CUDA graphs keeps the context-length bound.
            lens = getattr(forward_batch, "seq_lens_cpu", None)
            self._extend_max_kv_len = int(lens.max()) if lens is not None and lens.numel() else self.max_context_len

        def get_num_kv_splits(self, num_kv_splits: torch.Tensor, seq_lens: torch.Tensor):
            # Informational only: the kernels derive each row's split count from its position.
            num_seq = seq_lens.shape[0]
            group = num_kv_splits.shape[0] // num_seq
            lens = seq_lens.repeat_interleave(group) if group > 1 else seq_lens
            num_kv_splits[:] = (lens + self.split_tile_size - 1) // self.split_tile_size

        def _aligned_decode_fwd(
            self, q, k_buffer, v_buffer, o, kv_indptr, kv_indices, attn_logits, attn_lse, num_kv_splits,
            max_kv_splits, sm_scale, k_scale, v_scale, logit_cap=0.0, sinks=None, xai_temperature_len=-1,
            has_mla=False, use_pdl=False, page_size=1, score_mod=None, aux_tensors=None,
        ):  # fmt: skip
            _refuse_extras(logit_cap, sinks, xai_temperature_len, score_mod, k_scale, v_scale, has_mla=has_mla)
            return aligned_decode(
                q, k_buffer, v_buffer, o, kv_indptr, kv_indices, self.max_context_len, sm_scale=sm_scale,
                config=self.aligned_config, workspace=(attn_logits, attn_lse), qo_indptr=self._decode_qo_indptr,
            )  # fmt: skip

        def _aligned_extend_fwd(
            self, q, o, k_buffer, v_buffer, k_scale, v_scale, qo_indptr, kv_indptr, kv_indices, prefix_lens,
            max_len_extend, custom_mask=None, mask_indptr=None, sm_scale=None, logit_cap=0.0, is_causal=True,
            sliding_window_size=-1, sinks=None, window_start_pos=None, xai_temperature_len=-1, page_size=1,
            score_mod=None, aux_tensors=None,
        ):  # fmt: skip
            _refuse_extras(logit_cap, sinks, xai_temperature_len, score_mod, k_scale, v_scale)
            if custom_mask is not None:
                raise _Unsupported("custom attention masks (speculative verify)")
            if not is_causal:
                raise _Unsupported("non-causal attention")
            if sliding_window_size is not None and sliding_window_size > 0:
                raise _Unsupported("sliding-window attention")
            # prefix_lens is implied: each request's queries are its last qo_len keys.
            return aligned_extend(
                q, k_buffer, v_buffer, o, qo_indptr, kv_indptr, kv_indices, int(max_len_extend),
                self._extend_max_kv_len, sm_scale=sm_scale, config=self.aligned_config,
                workspace_bytes=self.workspace_bytes,
            )  # fmt: skip

        def _refuse_split_extend(self, *args, **kwargs):
            raise _Unsupported("the two-stage (prefix, extend) Triton extend path")

    AlignedTritonAttnBackend.__module__ = __name__
    return AlignedTritonAttnBackend


def _refuse_extras(logit_cap, sinks, xai_temperature_len, score_mod, k_scale, v_scale, has_mla=False):
    if has_mla:
        raise _Unsupported("MLA")
    if logit_cap and logit_cap > 0:
        raise _Unsupported(f"logit soft-capping (logit_cap={logit_cap})")
    if sinks is not None:
        raise _Unsupported("attention sinks")
    if xai_temperature_len is not None and xai_temperature_len > 0:
        raise _Unsupported("xai temperature scaling")
    if score_mod is not None:
        raise _Unsupported("score_mod")
    if float(k_scale) != 1.0 or float(v_scale) != 1.0:
        raise _Unsupported(f"scaled (fp8) KV caches (k_scale={k_scale}, v_scale={v_scale})")


_CLASS = None


def aligned_backend_class():
    """The AlignedTritonAttnBackend class (built on first use: importing SGLang's backend is slow)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS


def create_aligned_backend(runner: ModelRunner):
    """Attention-backend factory for SGLang's registry."""
    if runner.model_config.is_encoder_decoder:
        raise _Unsupported("encoder-decoder (cross) attention")
    if getattr(runner, "use_mla_backend", False):
        raise _Unsupported("MLA models")
    return aligned_backend_class()(runner)


def install() -> str:
    """Register the backend name and its server-arg choices; idempotent. Returns a line for the plugin log."""
    from sglang.srt import server_args
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    register_attention_backend(BACKEND_NAME)(create_aligned_backend)
    for choices, add in (
        (server_args.ATTENTION_BACKEND_CHOICES, server_args.add_attention_backend_choices),
        (server_args.DETERMINISTIC_ATTENTION_BACKEND_CHOICES, server_args.add_deterministic_attention_backend_choices),
        (
            server_args.RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND,
            server_args.add_radix_supported_deterministic_attention_backend_choices,
        ),
    ):
        if BACKEND_NAME not in choices:
            add([BACKEND_NAME])
    cfg = attention_config()
    line = (
        f"attention backend {BACKEND_NAME!r} registered (split S={cfg.split_size}, block_n={cfg.block_n},"
        f" block_m={cfg.block_m})"
    )
    if config.value(config.ALIGNED_ATTENTION) == "triton":
        ATTENTION_BACKENDS["triton"] = create_aligned_backend
        line += "; also serves --attention-backend triton"
    return line
