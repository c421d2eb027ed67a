"""Attention of SD3/SD3.5 joint blocks: one processor for separate and fused projections, with a choice of kernel.

Backends (`set_attention(transformer, backend)`):
  * "sdpa": 16-bit `F.scaled_dot_product_attention` (PyTorch picks cuDNN's flash kernel on Hopper), the same
    arithmetic as diffusers' `JointAttnProcessor2_0`.
  * "fp8_cudnn": FP8 (E4M3) attention through NVIDIA's cuDNN frontend `sdpa_fp8` graph (per-tensor scales; on
    Hopper its output is FP8 too). Q and K are quantized right after their RMS norms with a scale that needs no
    reduction: an RMS-normed vector of length D has |q_i| <= sqrt(D) * max|w|, so 448 / that bound never
    saturates. V gets a per-tensor amax scale; the output is stored with half V's scale (it is a convex
    combination of V rows, so it cannot exceed max|V|; the half leaves room for FP8 rounding of P). Under
    torch.compile the quantization fuses into the norm / concatenation kernels and the kernel runs as the
    custom op `sd35fp8::sdpa_fp8`.
  * "fp8_triton": FP8 attention through the project's Triton flash-attention kernel (`sd35fp8.attention_kernel`,
    bf16 output): Q and K quantized as for cuDNN, V per 128 keys of each head by their amax (no pass over all
    of V first; the kernel rescales its accumulator between groups) and written with the sequence innermost
    ((B, H, D, S padded to 16), the layout Hopper's FP8 tensor-core instructions want). With fused projections
    on CUDA the q/k norms, the concatenation and the three quantizations run as one more Triton kernel
    (`attention_kernel.quantize_qkv`); otherwise inductor fuses them under torch.compile. On the H200 at SD3.5
    Large's shape 2x38x4429x64 the kernel alone takes 0.79 ms against cuDNN bf16's 0.95 ms, the Q/K/V kernel 57 us
    (bench/results/gpu_h200_attention_fp8.json); a compiled Large step 95.0 vs 102.1 ms with "sdpa". Off CUDA it
    runs the kernel's arithmetic in float32 torch.
  * "fp8_reference": the same quantization with the attention emulated in float32 PyTorch (any device): what
    the CPU tests check against 16-bit attention, and the fallback when cuDNN refuses a shape.

diffusers' own `FusedJointAttnProcessor2_0` skips SD3.5's q/k RMS norms, which is why this processor exists.
"""

from __future__ import annotations

import logging
import math
import threading

import torch
import torch.nn.functional as F

from . import attention_kernel
from .attention_kernel import P_SCALE  # softmax probabilities are <= 1: scaled by 256 (exact) into E4M3's range
from .errors import error_summary
from .fp8 import FP8_DTYPE, FP8_MAX, Fp8Activation, tensor_amax

ATTENTION_BACKENDS = ("sdpa", "fp8_cudnn", "fp8_triton", "fp8_reference")
ATTENTION_LABELS = {
    "sdpa": "16-bit scaled_dot_product_attention (cuDNN / flash)",
    "fp8_cudnn": "FP8 attention (cuDNN frontend sdpa_fp8)",
    "fp8_triton": "FP8 attention (the project's Triton flash-attention kernel)",
    "fp8_reference": "FP8 attention emulated in float32 (reference, slow)",
}
log = logging.getLogger(__name__)
FALLBACKS: dict[tuple, str] = {}  # shapes cuDNN refused -> reason (the reference kernel ran instead)


# ------------------------------------------------------------------------------------------- FP8 kernels


def _scalar(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(1, 1, 1, 1).to(torch.float32)


def sdpa_fp8_reference(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                       descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                       attn_scale: float) -> torch.Tensor:
    """FP8 attention as the kernel computes it, in float32: inputs and output (B, S, H, D) E4M3; P rounded to
    E4M3 with scale P_SCALE; returns E4M3 output scaled by `scale_o`."""
    q = q8.float().transpose(1, 2) * descale_q.reshape(())
    k = k8.float().transpose(1, 2) * descale_k.reshape(())
    v = v8.float().transpose(1, 2) * descale_v.reshape(())
    probabilities = torch.softmax((q @ k.transpose(-1, -2)) * attn_scale, dim=-1)
    probabilities = (probabilities * P_SCALE).to(FP8_DTYPE).float() / P_SCALE
    out = (probabilities @ v).transpose(1, 2)
    return (out * scale_o.reshape(())).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


class _CudnnGraphs:
    """One built cuDNN `sdpa_fp8` graph per (shape, device), with its workspace; thread-safe."""

    def __init__(self):
        self.graphs: dict[tuple, tuple] = {}
        self.lock = threading.Lock()
        self.handles: dict[int, object] = {}

    def handle(self, cudnn, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self.handles:
            self.handles[index] = cudnn.create_handle()
        return self.handles[index]

    def get(self, shape: tuple[int, ...], device: torch.device, attn_scale: float):
        key = (tuple(shape), str(device), attn_scale)
        with self.lock:
            if key not in self.graphs:
                self.graphs[key] = self._build(shape, device, attn_scale)
            return self.graphs[key]

    def _build(self, shape, device, attn_scale):
        import cudnn

        handle = self.handle(cudnn, device)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
        batch, sequence, heads, dim = shape
        dims = (batch, heads, sequence, dim)  # cuDNN's logical order; memory stays (B, S, H, D)
        strides = (sequence * heads * dim, dim, heads * dim, 1)
        q, k, v = (graph.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in ("q", "k", "v"))
        scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
        dq, dk, dv, ds, ss, so = (graph.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so"))
        common = dict(q=q, k=k, v=v, descale_q=dq, descale_k=dk, descale_v=dv, descale_s=ds, scale_s=ss,
                      scale_o=so, attn_scale=attn_scale, use_causal_mask=False, name="sdpa_fp8")
        try:  # newer frontends name the inference switch generate_stats, older ones is_inference
            out, _, amax_s, amax_o = graph.sdpa_fp8(**common, generate_stats=False)
        except TypeError:
            out, _, amax_s, amax_o = graph.sdpa_fp8(**common, is_inference=True)
        out.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        workspace = torch.empty(max(1, graph.get_workspace_size()), dtype=torch.uint8, device=device)
        constants = {
            ss: torch.full((1, 1, 1, 1), P_SCALE, dtype=torch.float32, device=device),
            ds: torch.full((1, 1, 1, 1), 1 / P_SCALE, dtype=torch.float32, device=device),
            amax_s: torch.empty((1, 1, 1, 1), dtype=torch.float32, device=device),
            amax_o: torch.empty((1, 1, 1, 1), dtype=torch.float32, device=device),
        }
        return graph, handle, (q, k, v, dq, dk, dv, so, out), constants, workspace


_GRAPHS = _CudnnGraphs()


def cudnn_fp8_available() -> str | None:
    """None if the cuDNN frontend imports and a GPU is present, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import cudnn  # noqa: F401
    except Exception as error:  # noqa: BLE001 - an optional package
        return f"cuDNN frontend not importable ({type(error).__name__}: {error})"
    return None


@torch.library.custom_op("sd35fp8::sdpa_fp8", mutates_args=())
def sdpa_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
             descale_v: torch.Tensor, scale_o: torch.Tensor, attn_scale: float, kernel: str) -> torch.Tensor:
    """FP8 attention on (B, S, H, D) E4M3 tensors with per-tensor scales; E4M3 output scaled by `scale_o`."""
    q8, k8, v8 = q8.contiguous(), k8.contiguous(), v8.contiguous()
    if kernel == "cudnn" and q8.device.type == "cuda":
        key = (tuple(q8.shape), str(q8.device))
        if key not in FALLBACKS:
            try:
                graph, handle, (tq, tk, tv, tdq, tdk, tdv, tso, tout), constants, workspace = _GRAPHS.get(
                    tuple(q8.shape), q8.device, attn_scale)
                out = torch.empty_like(q8)
                import cudnn

                cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
                pack = {tq: q8, tk: k8, tv: v8, tdq: _scalar(descale_q), tdk: _scalar(descale_k),
                        tdv: _scalar(descale_v), tso: _scalar(scale_o), tout: out, **constants}
                graph.execute(pack, workspace, handle=handle)
                return out
            except Exception as error:  # noqa: BLE001 - fall back to the reference for this shape, say why
                FALLBACKS[key] = error_summary(error, 300)
                log.warning("cuDNN FP8 attention refused shape %s (%s); using the reference kernel", key, FALLBACKS[key])
    return sdpa_fp8_reference(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, attn_scale)


@sdpa_fp8.register_fake
def _sdpa_fp8_fake(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, attn_scale, kernel):
    return torch.empty_like(q8, memory_format=torch.contiguous_format)


def _rms_bound(norms, dim: int) -> torch.Tensor | None:
    """sqrt(D) * max|w| over the RMS norms that produced a tensor (None if any is missing or not an RMS norm)."""
    bounds = []
    for norm in norms:
        weight = getattr(norm, "weight", None)
        if type(norm).__name__ != "RMSNorm" or weight is None:
            return None
        bounds.append(weight.detach().abs().amax().float())
    if not bounds:
        return None
    return torch.stack(bounds).amax() * math.sqrt(dim) * 1.01  # 1% for bf16 rounding of the norm output


def _quantize_per_tensor(x: torch.Tensor, bound: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 copy of `x` with scale 448 / bound (bound: a static bound, else the tensor's amax); returns (x8, scale)."""
    amax = tensor_amax(x).float() if bound is None else bound.to(x.device)
    scale = FP8_MAX / amax.clamp(min=1e-12)
    return attention_kernel.scale_to_e4m3(x, scale), scale


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_bound, k_bound, kernel: str) -> torch.Tensor:
    """Attention over (B, S, H, D) 16-bit q/k/v through the FP8 kernel; returns (B, S, H, D) in q's dtype."""
    q8, q_scale = _quantize_per_tensor(q, q_bound)
    k8, k_scale = _quantize_per_tensor(k, k_bound)
    v8, v_scale = _quantize_per_tensor(v, None)
    scale_o = v_scale * 0.5
    out8 = torch.ops.sd35fp8.sdpa_fp8(q8, k8, v8, 1 / q_scale, 1 / k_scale, 1 / v_scale, scale_o,
                                      1.0 / math.sqrt(q.shape[-1]), kernel)
    return (out8.float() / scale_o).to(q.dtype)


def fp8_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_bound, k_bound) -> torch.Tensor:
    """Attention over (B, S, H, D) 16-bit q/k/v through the Triton FP8 kernel (on CUDA; its float32 arithmetic
    elsewhere); returns (B, S, H, D) in q's dtype."""
    q8, q_scale = _quantize_per_tensor(q, q_bound)
    k8, k_scale = _quantize_per_tensor(k, k_bound)
    attn_scale = 1.0 / math.sqrt(q.shape[-1])
    v8, descale_v = attention_kernel.quantize_v_grouped(v)
    if not q.is_cuda:
        v_natural = v8[..., :v.shape[1]].permute(0, 3, 1, 2)
        return attention_kernel.flash_attention_fp8_reference(q8, k8, v_natural, 1 / q_scale, 1 / k_scale,
                                                              descale_v, attn_scale).to(q.dtype)
    return attention_kernel.flash_attention_fp8(q8, k8, v8, 1 / q_scale, 1 / k_scale, descale_v, attn_scale,
                                                v_transposed=True).to(q.dtype)


def triton_prepares(x: torch.Tensor) -> bool:
    """Whether the fp8_triton backend prepares q/k/v with `attention_kernel.quantize_qkv` for these activations:
    on CUDA where Triton is installed (elsewhere it runs the kernel's float32 arithmetic in torch)."""
    return x.is_cuda and attention_kernel.available()


def fused_triton_attention(attn, hidden_states, encoder_hidden_states) -> torch.Tensor | None:
    """The fp8_triton backend with fused projections: q/k RMS norms, concatenation and E4M3 quantization of q/k/v in
    one kernel (`attention_kernel.quantize_qkv`), then the FP8 attention kernel; (B, S, H * D). None where the
    attention has no fused projections or norms the kernel does not compute (the caller takes the torch path)."""
    context = encoder_hidden_states is not None
    fused, added = getattr(attn, "to_qkv", None), getattr(attn, "to_added_qkv", None)
    norms = _qk_norms(attn, context)
    if fused is None or (context and added is None) or not attention_kernel.qkv_norms_fusable(norms):
        return None
    qkv = fused(hidden_states)
    context_qkv = added(encoder_hidden_states) if context else None
    heads = attn.heads
    width = qkv.shape[-1] // 3
    head_dim = width // heads
    scales = getattr(attn, "fp8_qk_scales", None)  # (q, k, 1/q, 1/k), kept by `set_attention`
    if scales is None or scales.dtype != torch.float32:  # (a transformer cast after set_attention)
        scales = qk_scales(norms, head_dim)
    q8, k8, v8, descale_v = attention_kernel.quantize_qkv(qkv, context_qkv, norms, heads, scales[:2])
    out = attention_kernel.flash_attention_fp8(q8, k8, v8, scales[2], scales[3], descale_v,
                                               1.0 / math.sqrt(head_dim), v_transposed=True)
    return out.reshape(qkv.shape[0], -1, width).to(qkv.dtype)


def _qk_norms(attn, context: bool) -> tuple:
    """The RMS norms q/k (and, with context tokens, their added_q/k) pass through: (norm_q, norm_k[, added q, k])."""
    return (attn.norm_q, attn.norm_k) + ((attn.norm_added_q, attn.norm_added_k) if context else ())


def qk_scales(norms: tuple, head_dim: int) -> torch.Tensor:
    """float32 (q scale, k scale, 1 / q scale, 1 / k scale) of the fp8_triton backend: 448 over the static bound of
    the q and k RMS norms' outputs (`norms`: norm_q, norm_k[, norm_added_q, norm_added_k])."""
    scales = FP8_MAX / torch.stack([_rms_bound(norms[0::2], head_dim), _rms_bound(norms[1::2], head_dim)])
    return torch.cat([scales, 1 / scales])


def _keep_qk_scales(attn) -> None:
    """Compute the fp8_triton scales of `attn` once, from its norms' weights, as a buffer (moved with the model):
    computed in every call they were 3 small kernels a block (111 of a Large step's ~1,750)."""
    context = getattr(attn, "add_q_proj", None) is not None or getattr(attn, "to_added_qkv", None) is not None
    norms = _qk_norms(attn, context)
    if not attention_kernel.qkv_norms_fusable(norms):
        return
    with torch.no_grad():
        scales = qk_scales(norms, attn.inner_dim // attn.heads)
    attn.register_buffer("fp8_qk_scales", scales, persistent=False)


# ------------------------------------------------------------------------------------------- the processor


def _project(attention, fused_name: str, names: tuple[str, str, str], x: torch.Tensor):
    fused = getattr(attention, fused_name, None)
    if fused is not None:
        return fused(x).chunk(3, dim=-1)
    return tuple(getattr(attention, name)(x) for name in names)


class JointAttention:
    """Processor for diffusers' `Attention` in SD3/SD3.5 blocks (joint and the dual-attention self-attention),
    running separate or fused projections and the chosen attention backend. Its inputs may be 16-bit tensors or
    `Fp8Activation`s already quantized for the FP8 projections (`sd35fp8.blocks`)."""

    def __init__(self, backend: str = "sdpa"):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        self.backend = backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        shaped = hidden_states.data if isinstance(hidden_states, Fp8Activation) else hidden_states  # (B, T, C)
        batch, tokens = shaped.shape[0], shaped.shape[1]
        context = encoder_hidden_states is not None
        out = None
        if self.backend == "fp8_triton" and triton_prepares(shaped):
            out = fused_triton_attention(attn, hidden_states, encoder_hidden_states)
        if out is None:
            out = self._attention(attn, hidden_states, encoder_hidden_states, batch)
        if context:
            out, encoder_out = out[:, :tokens], out[:, tokens:]
            if not attn.context_pre_only:
                encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return (out, encoder_out) if context else out

    def _attention(self, attn, hidden_states, encoder_hidden_states, batch: int) -> torch.Tensor:
        """Projections, q/k norms and the backend's attention: (B, S, H * D) in the activations' dtype."""
        heads = attn.heads
        query, key, value = _project(attn, "to_qkv", ("to_q", "to_k", "to_v"), hidden_states)
        head_dim = key.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        context = encoder_hidden_states is not None
        q_norms, k_norms = [attn.norm_q], [attn.norm_k]
        if context:
            c_query, c_key, c_value = _project(attn, "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                               encoder_hidden_states)
            c_query, c_key, c_value = (t.view(batch, -1, heads, head_dim) for t in (c_query, c_key, c_value))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            q_norms.append(attn.norm_added_q)
            k_norms.append(attn.norm_added_k)
        if self.backend == "sdpa":  # diffusers' order: heads first, concatenate along the sequence
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))
            if context:
                query = torch.cat([query, c_query.transpose(1, 2)], dim=2)
                key = torch.cat([key, c_key.transpose(1, 2)], dim=2)
                value = torch.cat([value, c_value.transpose(1, 2)], dim=2)
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        else:
            if context:
                query = torch.cat([query, c_query], dim=1)
                key = torch.cat([key, c_key], dim=1)
                value = torch.cat([value, c_value], dim=1)
            bounds = _rms_bound(q_norms, head_dim), _rms_bound(k_norms, head_dim)
            if self.backend == "fp8_triton":
                out = fp8_attention_triton(query, key, value, *bounds)
            else:
                out = fp8_attention(query, key, value, *bounds, "cudnn" if self.backend == "fp8_cudnn" else "reference")
            out = out.reshape(batch, -1, heads * head_dim)
        return out


def set_attention(transformer: torch.nn.Module, backend: str) -> int:
    """Install `JointAttention(backend)` on every attention of an SD3 transformer; returns how many."""
    processor = JointAttention(backend)
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in transformer.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
            if backend == "fp8_triton":
                _keep_qk_scales(module)
            count += 1
    return count


def attention_of(transformer: torch.nn.Module) -> str | None:
    """The backend the transformer's attentions run ("sdpa", "fp8_cudnn", ...), "diffusers" for diffusers' own."""
    from diffusers.models.attention_processor import Attention

    backends = {getattr(m.processor, "backend", "diffusers") for m in transformer.modules() if isinstance(m, Attention)}
    return backends.pop() if len(backends) == 1 else ("mixed" if backends else None)
