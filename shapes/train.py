"""Train the tiny-shapes SD3 pipeline: VAE first, then the transformer with SD3's rectified flow.

    python -m shapes.train --out DIR [--device cuda] [--iterations N] [--vae-iterations N] [--time-limit S] ...

Everything is generated in code (`shapes.data`): no download. Bitwise deterministic for a given seed and
iteration count, on the CPU and on CUDA (`set_kernels`; `--no-deterministic` trades that for cuDNN's benchmarked
kernels). A progress bar shows the loss. Writes DIR as a diffusers `StableDiffusion3Pipeline` folder in safetensors (bf16; the two small CLIP encoders
float32, see `storage_dtype`), with a model card (README.md), `loss_curve.png` and `training_log.json`.

`--checkpoint-dir` additionally writes the weights every `--checkpoint-every` seconds as a few safetensors
shards plus the log (what a time-limited remote run brings back); `--from-checkpoint DIR --out OUT` turns such
a checkpoint into the pipeline folder without training. `--stop-after S --state-dir DIR` stops after S seconds
with the full training state in DIR, and the same command continues it (for machines that cap how long
one command may run: the shipped model's 14.6-minute run took two such processes).

The objective is SD3's: latents x0 = (VAE sample - shift) * scale, noise e, sigma ~ sigmoid(N(0, 1))
(logit-normal), x_t = (1 - sigma) x0 + sigma e, the transformer (timestep = 1000 sigma) predicts the velocity
e - x0; captions are replaced by "" with probability `--cfg-dropout`, so classifier-free guidance works with
the stock `FlowMatchEulerDiscreteScheduler` and pipeline.

Speed (H200, 128 px): the text encoders stay frozen at their seeded init by default (every training caption is
encoded once), and on CUDA the transformer's forward and backward replay as CUDA graphs, one per resolution: 27 ms an
iteration at the default batch 64 against ~90 ms eager (an eager step of this small model waits on Python launching
its kernels). `bench/NOTES.md` has the measurements and the recipes tried.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sd35fp8.errors import BadInput, run_command
from sd35fp8.tiny import SHAPES_GUIDANCE, SHAPES_STEPS

from . import data
from .model import ModelConfig, build_pipeline, clip_tokenizer, parameter_count, t5_tokenizer, trainable_modules

RESOLUTION_CYCLE = (128, 64, 128, 256, 128)  # one resolution per iteration, in this order
CONFIGS = {"default": ModelConfig, "small": ModelConfig.small, "tiny": ModelConfig.tiny}
BATCH_SCALE = {64: 2.0, 128: 1.0, 256: 0.5}  # batch size multiplier per resolution
CHECKPOINT_SHARD_BYTES = 12 * 2**20
UNBOUNDED = 10**9  # the iteration count of a phase that runs until its share of --time-limit is spent
T0 = time.perf_counter()  # this process's start: what --stop-after and the logged seconds count from


@dataclass
class TrainSettings:
    iterations: int = 3000
    vae_iterations: int = 2000
    batch: int = 64  # at 128 px; more steps beat bigger batches here (bench/results/gpu_h200_train.json)
    vae_batch: int = 64
    lr: float = 6e-4
    vae_lr: float = 5e-4
    warmup: int = 200
    cfg_dropout: float = 0.1
    kl_weight: float = 1e-5
    ema: float = 0.999
    train_text_encoders: bool = False  # frozen: each training caption is encoded once (`PromptEncoder.freeze`)
    time_limit: float | None = None  # seconds for both phases together: each runs as many iterations as fit
    vae_share: float = 0.12  # share of time_limit the VAE gets
    seed: int = 0
    log_every: int = 10
    resolutions: tuple[int, ...] = RESOLUTION_CYCLE  # one per iteration, cycled
    probe: int = 0  # after training, score this many train and held-out captions with the detector
    deterministic: bool = True  # deterministic kernels (on CUDA they can be slower: cuDNN's deterministic convolutions)
    compile: bool = False  # torch.compile the transformer for training (fewer, fused kernels; compiles per shape first)
    cuda_graphs: bool = True  # on CUDA, replay the transformer's forward and backward as CUDA graphs (one per resolution)
    stop_after: float | None = None  # seconds of this process: then save the full state (`TrainingState`) and stop


# ------------------------------------------------------------------------------------------ helpers


def _schedule(step: int, iterations: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine from the end of warm-up down to 5% of the peak."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    done = max(0, step - warmup) / max(1, iterations - warmup)
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


class Budget:
    """How many iterations a phase runs: `iterations`, or, with a time limit, as many as fit in it.

    With a limit, the speed is measured over iterations 5..30 (inside the warm-up, where the learning rate does
    not depend on the total) and the total is fixed then, so the run equals one with `--iterations <total>`.
    A hard stop at 1.1x the limit guards against a machine that slows down later.
    """

    CALIBRATE = (5, 30)

    def __init__(self, iterations: int, seconds: float | None):
        self.iterations, self.seconds, self.started = iterations, seconds, time.perf_counter()
        self.mark = None

    def running(self, step: int) -> bool:
        if self.seconds:
            elapsed = time.perf_counter() - self.started
            if step == self.CALIBRATE[0]:
                self.mark = elapsed
            elif step == self.CALIBRATE[1] and self.mark is not None:
                rate = (elapsed - self.mark) / (self.CALIBRATE[1] - self.CALIBRATE[0])
                fits = step + int((self.seconds - elapsed) / rate)
                self.iterations = max(step, min(self.iterations, fits))
                print(f"\n{rate * 1000:.0f} ms/iteration: running {self.iterations} iterations", flush=True)
            if elapsed > 1.1 * self.seconds:
                print(f"\nstopped by the time limit at iteration {step}", flush=True)
                return False
        return step < self.iterations

    def settled(self, step: int) -> bool:
        """Whether the iteration count is final (with a time limit, it is fixed at step `CALIBRATE[1]`)."""
        return not self.seconds or step >= self.CALIBRATE[1]

    def resume(self, iterations: int, elapsed: float) -> None:
        """Continue a stopped phase: its final count, and the seconds it had already run."""
        self.iterations, self.started = iterations, time.perf_counter() - elapsed


def _batch_size(base: int, resolution: int) -> int:
    return max(1, int(round(base * BATCH_SCALE.get(resolution, (128 / resolution) ** 2))))


def _images(rng: random.Random, count: int, resolution: int, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    scenes = data.batch(rng, count, "train")
    return data.render(scenes, resolution, device) * 2 - 1, [scene.caption for scene in scenes]


def _autocast(device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA, none on the CPU; `cache=False` for code a CUDA graph captures."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------------------------- VAE


def vae_losses(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's training losses on `images` (in [-1, 1]): reconstruction (L1 + MSE of a sampled latent's decoding)
    and the KL divergence of its posterior from N(0, 1), both float32."""
    with _autocast(images.device):
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample()
        recon = vae.decode(latents).sample
    recon = recon.float()
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return F.l1_loss(recon, images) + F.mse_loss(recon, images), kl


def train_vae(pipe, settings: TrainSettings, device: torch.device, log: dict, checkpoint) -> None:
    vae = pipe.vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    rng = random.Random(settings.seed + 101)
    limit = settings.time_limit * settings.vae_share if settings.time_limit else None
    budget = Budget(settings.vae_iterations, limit)
    losses = log.setdefault("vae_loss", [])
    bar = tqdm(total=settings.vae_iterations, desc="VAE", dynamic_ncols=True, mininterval=2.0)
    step = 0
    while budget.running(step):
        resolution = settings.resolutions[step % len(settings.resolutions)]
        images, _ = _images(rng, _batch_size(settings.vae_batch, resolution), resolution, device)
        for group in optimizer.param_groups:
            group["lr"] = settings.vae_lr * _schedule(step, budget.iterations, settings.warmup)
        rec, kl = vae_losses(vae, images)
        loss = rec + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % settings.log_every == 0 or step == 1:  # reading the loss waits for the GPU: only when logging
            losses.append([step, rec.item(), kl.item()])
            bar.set_postfix(rec=f"{losses[-1][1]:.4f}", kl=f"{losses[-1][2]:.1f}", res=resolution)
        bar.total = budget.iterations
        bar.update(1)
        checkpoint.maybe(pipe, log)
    bar.close()
    log["vae_iterations_done"] = step
    vae.eval()
    set_latent_statistics(pipe, device, settings.seed)
    print(f"VAE: {step} iterations, reconstruction loss {losses[-1][1]:.4f}, "
          f"scaling_factor {pipe.vae.config.scaling_factor:.4f}, shift_factor {pipe.vae.config.shift_factor:.4f}", flush=True)


@torch.no_grad()
def set_latent_statistics(pipe, device: torch.device, seed: int, count: int = 1024) -> None:
    """Set the VAE's shift_factor / scaling_factor so that training latents have mean 0 and std 1."""
    rng = random.Random(seed + 7)
    samples = []
    for _ in range(max(1, count // 128)):
        images, _ = _images(rng, 128, 128, device)
        samples.append(pipe.vae.encode(images).latent_dist.sample().float())
    latents = torch.cat(samples)
    mean, std = float(latents.mean()), float(latents.std())
    pipe.vae.register_to_config(shift_factor=round(mean, 6), scaling_factor=round(1.0 / std, 6))


# -------------------------------------------------------------------------------------- transformer


class PromptEncoder:
    """`StableDiffusion3Pipeline.encode_prompt` for training: the same computation (CLIP-L/G penultimate hidden
    states padded to T5's width, then T5's, along the sequence; pooled = both CLIP projections), with each
    caption's token ids computed once and cached (tokenizing 256 captions three times per step costs more than
    the GPU step). `tests/test_shapes.py` checks it against the pipeline's own `encode_prompt`."""

    def __init__(self, pipe, max_sequence_length: int = 256):
        self.pipe, self.max_sequence_length = pipe, max_sequence_length
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.rows: dict[str, int] | None = None  # frozen encoders (`freeze`): each caption's row in the table
        self.filled: set[str] = set()
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None

    def _tokenize(self, captions: list[str]) -> None:
        pipe = self.pipe
        clip = [tok(captions, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]
        t5 = pipe.tokenizer_3(captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                              add_special_tokens=True, return_tensors="pt").input_ids
        self.cache.update({caption: (a, b, c) for caption, a, b, c in zip(captions, clip[0], clip[1], t5)})

    def ids(self, caption: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if caption not in self.cache:
            self._tokenize([caption])
        return self.cache[caption]

    def warm(self, captions, chunk: int = 4096) -> None:
        """Tokenize `captions` now, in batches (before a timed run, so its speed is measured with the cache it
        will have)."""
        captions = sorted(captions)
        for start in tqdm(range(0, len(captions), chunk), desc="tokenizing", dynamic_ncols=True, mininterval=2.0):
            self._tokenize(captions[start:start + chunk])

    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows is None:
            return self._encode(captions, device)
        missing = [c for c in dict.fromkeys(captions) if c not in self.filled]
        if missing:
            self._fill(missing, device)
        embeds, pooled = self.table
        rows = data.to_device(torch.tensor([self.rows[c] for c in captions]), embeds.device)
        return embeds[rows], pooled[rows]

    def _encode(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        ids = [data.to_device(torch.stack(column), device) for column in zip(*(self.ids(c) for c in captions))]
        hidden, pooled = [], []
        for encoder, token_ids in ((pipe.text_encoder, ids[0]), (pipe.text_encoder_2, ids[1])):
            output = encoder(token_ids, output_hidden_states=True)
            pooled.append(output[0])
            hidden.append(output.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        t5 = pipe.text_encoder_3(ids[2])[0]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    @torch.no_grad()
    def freeze(self, captions, device: torch.device, upfront: bool = True, chunk: int = 1024) -> None:
        """For training with frozen text encoders: every caption of `captions` is encoded once into a table on
        `device` (~2 GB for the 25,169 training captions on CUDA), and a call becomes a lookup. `upfront` encodes
        them all now (before a timed run, so its speed is measured as it will be); otherwise each caption is encoded
        the first time a call asks for it (a few iterations on the CPU need a few hundred of them)."""
        captions = sorted(captions)
        self.rows, self.filled, self.table = {caption: row for row, caption in enumerate(captions)}, set(), None
        if upfront:
            self.warm(captions)
            for start in range(0, len(captions), chunk):
                self._fill(captions[start:start + chunk], device)

    @torch.no_grad()
    def _fill(self, captions: list[str], device: torch.device) -> None:
        with _autocast(device):
            embeds, pooled = self._encode(captions, device)
        if device.type == "cuda":  # the transformer's first use of both is a linear layer, which autocast runs in
            embeds, pooled = embeds.bfloat16(), pooled.bfloat16()  # bf16 anyway: the same steps at half the memory
        if self.table is None:
            self.table = (embeds.new_empty((len(self.rows), *embeds.shape[1:])),
                          pooled.new_empty((len(self.rows), *pooled.shape[1:])))
        rows = data.to_device(torch.tensor([self.rows[c] for c in captions]), embeds.device)
        self.table[0][rows], self.table[1][rows] = embeds, pooled
        self.filled.update(captions)


def noised_latents(pipe, images: torch.Tensor, generator: torch.Generator | None = None):
    """SD3's rectified-flow training input for `images` (in [-1, 1]): x0 = (VAE sample - shift) * scale, noise e,
    sigma ~ sigmoid(N(0, 1)); returns x_t = (1 - sigma) x0 + sigma e, sigma and the velocity target e - x0."""
    device = images.device
    with torch.no_grad(), _autocast(device):
        latents = pipe.vae.encode(images).latent_dist.sample(generator=generator).float()
    x0 = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=generator, device=device)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator, device=device))
    s = sigma[:, None, None, None]
    return (1 - s) * x0 + s * noise, sigma, noise - x0


def velocity_loss(predict, noisy, sigma, target, embeds, pooled) -> torch.Tensor:
    """Mean squared error of the velocity `predict` (a `VelocityPredictor` or its CUDA-graphed form) returns."""
    return F.mse_loss(predict(noisy, sigma, embeds, pooled), target)


class VelocityPredictor(torch.nn.Module):
    """The transformer's velocity prediction, float32: the module a CUDA-graphed training step captures (autocast's
    weight cache is off, as CUDA graph capture requires)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, noisy, sigma, embeds, pooled):
        with _autocast(noisy.device, cache=False):
            return self.transformer(hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
                                    timestep=sigma * 1000, return_dict=False)[0].float()


def graphed_predictors(transformer, encode, device: torch.device, batches: dict[int, int],
                       embeds_require_grad: bool) -> dict[int, object]:
    """Per training resolution, the transformer's forward and backward captured as CUDA graphs
    (`torch.cuda.make_graphed_callables`); `batches` maps resolution -> the batch it trains with, `encode` (a
    `PromptEncoder`) gives the prompt tensors' shapes. Replaying a graph launches the step's thousand-odd kernels
    at once instead of one by one from Python, which is what bounds an eager step of this small model."""
    predictors = {}
    for resolution, batch in batches.items():
        latent = resolution // 8
        with _autocast(device):
            embeds, pooled = (t.detach().clone().requires_grad_(embeds_require_grad)
                              for t in encode([""] * batch, device))
        example = (torch.randn(batch, 16, latent, latent, device=device), torch.rand(batch, device=device), embeds, pooled)
        predictors[resolution] = torch.cuda.make_graphed_callables(VelocityPredictor(transformer), example)
    return predictors


def _graphs(pipe, settings: TrainSettings, device: torch.device, encode) -> dict[int, object]:
    """`graphed_predictors` for every training resolution, or {} (eager) off CUDA or where capturing fails."""
    if device.type != "cuda":
        return {}
    batches = {resolution: _batch_size(settings.batch, resolution) for resolution in sorted(set(settings.resolutions))}
    try:
        predictors = graphed_predictors(pipe.transformer, encode, device, batches, settings.train_text_encoders)
    except RuntimeError as error:  # e.g. an operation CUDA graphs cannot capture on this GPU / torch
        print(f"CUDA graphs unavailable, training eagerly: {str(error).splitlines()[0]}", flush=True)
        return {}
    print(f"transformer forward and backward captured as CUDA graphs at {', '.join(map(str, batches))} px", flush=True)
    return predictors


def update(params, optimizer, loss: torch.Tensor, ema_params, ema_weight: float) -> None:
    """Backward, clip to norm 1, step, and move the EMA weights `ema_weight` of the way to the new ones."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    if ema_weight:
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, ema_weight)


def train_transformer(pipe, settings: TrainSettings, device: torch.device, log: dict, checkpoint,
                      state: TrainingState | None = None) -> bool:
    """Train the transformer (and the text encoders if asked); False when `settings.stop_after` stopped it, after
    writing `state` (a `TrainingState`; a saved one there is continued from)."""
    modules = {"transformer": pipe.transformer}
    if settings.train_text_encoders:
        modules |= {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    for name, module in trainable_modules(pipe).items():
        module.to(device)
        module.requires_grad_(name in modules)
        module.train(name in modules)
    params = [p for m in modules.values() for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=settings.lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    ema = {name: copy.deepcopy(module).eval().requires_grad_(False) for name, module in modules.items()}
    if settings.ema <= 0:  # no averaging: the last weights are the model
        ema = dict(modules)
    checkpoint.ema = ema
    ema_params = [p for name in modules for p in ema[name].parameters()]
    encode = PromptEncoder(pipe)
    captions = data.all_captions("train") | {""}  # "" is the caption-dropout prompt
    if not settings.train_text_encoders:
        encode.freeze(captions, device, upfront=device.type == "cuda")
    elif settings.time_limit:  # the speed the time limit is planned on must not include first-time tokenization
        encode.warm(captions)
    predict = VelocityPredictor(pipe.transformer)
    predict = torch.compile(predict) if settings.compile else predict
    predictors = _graphs(pipe, settings, device, encode) if settings.cuda_graphs and not settings.compile else {}
    log["cuda_graphs"] = bool(predictors)
    rng = random.Random(settings.seed + 202)
    generator = torch.Generator(device).manual_seed(settings.seed + 303)
    limit = settings.time_limit * (1 - settings.vae_share) if settings.time_limit else None
    budget = Budget(settings.iterations, limit)
    losses = log.setdefault("transformer_loss", [])
    step, running = 0, None
    if state and state.exists():
        step, running = state.restore(modules, ema, optimizer, rng, generator, budget)
    bar = tqdm(total=budget.iterations, initial=step, desc="transformer", dynamic_ncols=True, mininterval=2.0)
    while budget.running(step):
        resolution = settings.resolutions[step % len(settings.resolutions)]
        images, captions = _images(rng, _batch_size(settings.batch, resolution), resolution, device)
        captions = ["" if rng.random() < settings.cfg_dropout else data.variant(c, rng) for c in captions]
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * _schedule(step, budget.iterations, settings.warmup)
        noisy, sigma, target = noised_latents(pipe, images, generator)
        with _autocast(device):
            embeds, pooled = encode(captions, device)
        loss = velocity_loss(predictors.get(resolution, predict), noisy, sigma, target, embeds, pooled)
        ema_weight = 1 - min(settings.ema, (1 + step) / (10 + step)) if settings.ema > 0 else 0.0
        update(params, optimizer, loss, ema_params, ema_weight)
        step += 1
        if step % settings.log_every == 0 or step == 1:  # reading the loss waits for the GPU: only when logging
            value = loss.item()
            running = value if running is None else 0.9 * running + 0.1 * value
            losses.append([step, value, resolution])
            bar.set_postfix(loss=f"{running:.4f}", res=resolution)
        bar.total = budget.iterations
        bar.update(1)
        checkpoint.maybe(pipe, log)
        if (state and settings.stop_after is not None and time.perf_counter() - T0 >= settings.stop_after
                and budget.settled(step) and step < budget.iterations):
            bar.close()
            state.write(pipe, modules, ema, optimizer, rng, generator, step, budget, running, log, settings)
            print(f"stopped after {time.perf_counter() - T0:.0f} s at transformer iteration {step} of {budget.iterations}; "
                  f"the full training state is in {state.folder}: run the same command again to continue", flush=True)
            return False
    bar.close()
    log["iterations_done"] = step
    log["transformer_seconds"] = round(time.perf_counter() - budget.started, 1)  # the iterations alone
    for name, module in modules.items():  # the EMA weights are the model
        if ema[name] is not module:
            module.load_state_dict(ema[name].state_dict())
        module.eval().requires_grad_(False)
    checkpoint.ema = None
    print(f"transformer: {step} iterations, final smoothed loss {running:.4f}", flush=True)
    return True


@torch.no_grad()
def probe(pipe, device: torch.device, count: int, steps: int = SHAPES_STEPS, guidance: float = SHAPES_GUIDANCE,
          size: int = 128) -> dict:
    """Caption accuracy (`shapes.detector`) on `count` training and `count` held-out captions, in percent."""
    from .detector import score

    pipe.to(device)
    rng = random.Random(4242)
    sets = {"train": [data.sample_spec(rng, "train") for _ in range(count)],
            "heldout": data.eval_specs(200)[:: max(1, 200 // count)][:count]}
    result = {"steps": steps, "guidance": guidance, "size": size}
    for name, specs in sets.items():
        correct = 0
        for start in range(0, len(specs), 32):
            chunk = specs[start:start + 32]
            images = pipe([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance, height=size,
                          width=size, generator=torch.Generator("cpu").manual_seed(start)).images
            correct += sum(score(spec, image)["correct"] for spec, image in zip(chunk, images))
        result[name] = round(100 * correct / len(specs), 1)
    print(f"probe: caption accuracy {result['train']}% on training captions, {result['heldout']}% on held-out "
          f"({count} each, {steps} steps, guidance {guidance}, {size}px)", flush=True)
    return result


# ----------------------------------------------------------------------------------- saving, checkpoints


def storage_dtype(component: str) -> torch.dtype:
    """The dtype each component is shipped (and checkpointed) in.

    bf16 for the transformer, VAE and T5: `python -m convert` verifies its FP8 T5 in the transformer's stored
    dtype and `load_pipeline` runs FP8 pipelines in bf16 on the CPU, and transformers reloads an FP8 T5's
    unquantized tensors in their stored dtype, so T5, transformer and compute dtype must agree (an fp16
    checkpoint fails there with "expected m1 and m2 to have the same dtype"). The two CLIP encoders (2% of the
    bytes) stay float32: transformers loads a checkpoint in its stored dtype unless told otherwise and
    diffusers in float32, so a plain `StableDiffusion3Pipeline.from_pretrained(folder)` then runs in float32.
    """
    return torch.float32 if component in ("text_encoder", "text_encoder_2") else torch.bfloat16


def _state(pipe, ema: dict | None = None) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in trainable_modules(pipe).items():
        source = ema.get(name, module) if ema else module
        for key, value in source.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu", storage_dtype(name)).contiguous()
    return tensors


class Checkpointer:
    """Writes the weights (EMA weights where training keeps them) and the log every `every` seconds."""

    def __init__(self, folder: Path | None, every: float, config: ModelConfig, settings: TrainSettings):
        self.folder, self.every, self.config, self.settings = folder, every, config, settings
        self.last = time.perf_counter()
        self.ema = None

    def maybe(self, pipe, log: dict) -> None:
        if self.folder and time.perf_counter() - self.last >= self.every:
            self.write(pipe, log)

    def write(self, pipe, log: dict) -> None:
        if not self.folder:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = _state(pipe, self.ema)
        shards, current, size = [], {}, 0
        for key, value in tensors.items():
            nbytes = value.numel() * value.element_size()
            if current and size + nbytes > CHECKPOINT_SHARD_BYTES:
                shards.append(current)
                current, size = {}, 0
            current[key] = value
            size += nbytes
        shards.append(current)
        for old in self.folder.glob("checkpoint-*.safetensors"):
            old.unlink()
        for i, shard in enumerate(shards):
            save_file(shard, str(self.folder / f"checkpoint-{i + 1}-of-{len(shards)}.safetensors"))
        meta = dict(log, config=self.config.to_dict(), settings=vars(self.settings), vae_factors=_vae_factors(pipe))
        (self.folder / "training_log.json").write_text(json.dumps(meta) + "\n")
        plot_losses(meta, self.folder / "loss_curve.png")
        self.last = time.perf_counter()
        print(f"checkpoint written to {self.folder} ({log.get('phase')}, {time.perf_counter() - T0:.0f} s)", flush=True)


def _vae_factors(pipe) -> dict:
    """The VAE's latent factors, as its config holds them (saved with every checkpoint and training state)."""
    return {"scaling_factor": pipe.vae.config.scaling_factor, "shift_factor": pipe.vae.config.shift_factor}


def _segments(log: dict) -> list[float]:
    """The seconds of each process a run has taken so far, this one's included."""
    return log.get("segments", []) + [round(time.perf_counter() - T0, 1)]


def _run_identity(config: ModelConfig, settings: TrainSettings) -> dict:
    """What a stopped run must be continued with: the model config and settings (JSON-normalized)."""
    settings = {k: v for k, v in vars(settings).items() if k not in ("stop_after", "probe")}
    return json.loads(json.dumps(dict(settings, config=config.to_dict())))


class TrainingState:
    """The transformer phase's full state in a folder: the VAE, the trained modules and their EMA copies, the
    optimizer's moments, both random generators and the progress (step, planned iterations, seconds, log).

    A run stopped by `--stop-after` (for machines that cap how long a command may run) writes it; the same command
    with the same `--state-dir` continues from it, and the weights equal those of one uninterrupted run
    (tests/test_shapes.py checks this on the CPU; it held on an H200 too). A finished run removes it. Tensors are safetensors; the rest JSON.
    """

    TENSORS, INFO = "state.safetensors", "state.json"

    def __init__(self, folder: Path, config: ModelConfig):
        self.folder, self.config = folder, config
        self.info: dict | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def exists(self) -> bool:
        return (self.folder / self.INFO).is_file()

    def write(self, pipe, modules, ema, optimizer, rng, generator, step, budget, running, log, settings) -> None:
        from safetensors.torch import save_file

        def copies(prefix, module):  # copies: tied weights (T5's embeddings) share storage, which safetensors refuses
            return {f"{prefix}.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}

        tensors = copies("vae", pipe.vae)
        for name, module in modules.items():
            tensors |= copies(f"model.{name}", module)
            if ema[name] is not module:
                tensors |= copies(f"ema.{name}", ema[name])
        optimized = optimizer.state_dict()
        for index, values in optimized["state"].items():
            tensors |= {f"optimizer.{index}.{k}": v.detach().to("cpu", copy=True) for k, v in values.items()}
        tensors["generator"] = generator.get_state()
        info = {"step": step, "iterations": budget.iterations, "elapsed": time.perf_counter() - budget.started,
                "running": running, "rng": rng.getstate(), "param_groups": optimized["param_groups"],
                "vae_factors": _vae_factors(pipe), "run": _run_identity(self.config, settings),
                "log": dict(log, segments=_segments(log))}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / self.INFO).unlink(missing_ok=True)  # the info file marks a complete state: written last
        save_file(tensors, str(self.folder / f"{self.TENSORS}.partial"))
        os.replace(self.folder / f"{self.TENSORS}.partial", self.folder / self.TENSORS)
        (self.folder / f"{self.INFO}.partial").write_text(json.dumps(info) + "\n")
        os.replace(self.folder / f"{self.INFO}.partial", self.folder / self.INFO)

    def read(self, settings: TrainSettings) -> dict:
        """Load the saved state (checking it belongs to this run's model and settings); returns its log."""
        from safetensors.torch import load_file

        info = json.loads((self.folder / self.INFO).read_text())
        saved, wanted = info["run"], _run_identity(self.config, settings)
        differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        if differ:
            raise BadInput(f"{self.folder} holds a stopped run with other settings ({', '.join(differ)}): continue it "
                           "with the command that started it, or use another --state-dir")
        self.info, self.tensors = info, load_file(str(self.folder / self.TENSORS))
        return info["log"]

    def _load(self, prefix: str, module) -> None:
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")})

    def restore_vae(self, pipe) -> None:
        self._load("vae", pipe.vae)
        pipe.vae.register_to_config(**self.info["vae_factors"])

    def restore(self, modules, ema, optimizer, rng, generator, budget) -> tuple[int, float | None]:
        """Put the saved weights, moments and generators back; returns the step and the smoothed loss."""
        for name, module in modules.items():
            self._load(f"model.{name}", module)
            if ema[name] is not module:
                self._load(f"ema.{name}", ema[name])
        moments: dict[int, dict] = {}
        for key, value in self.tensors.items():
            if key.startswith("optimizer."):
                _, index, what = key.split(".", 2)
                moments.setdefault(int(index), {})[what] = value
        optimizer.load_state_dict({"state": moments, "param_groups": self.info["param_groups"]})
        version, internal, gauss = self.info["rng"]
        rng.setstate((version, tuple(internal), gauss))
        generator.set_state(self.tensors["generator"])
        budget.resume(self.info["iterations"], self.info["elapsed"])
        return self.info["step"], self.info["running"]

    def remove(self) -> None:
        for name in (self.INFO, self.TENSORS):
            (self.folder / name).unlink(missing_ok=True)


def load_checkpoint(folder: Path):
    """The pipeline (float32) and training log a `Checkpointer` wrote."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "training_log.json").read_text())
    pipe = build_pipeline(ModelConfig.from_dict(meta["config"]))
    tensors = {}
    for shard in sorted(folder.glob("checkpoint-*.safetensors")):
        tensors |= load_file(str(shard))
    for name, module in trainable_modules(pipe).items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state)
    pipe.vae.register_to_config(**meta["vae_factors"])
    return pipe, meta


def write_pipeline(pipe, out: Path, meta: dict) -> Path:
    """Save `pipe` as a 16-bit diffusers folder with its model card, loss curve and training log."""
    out.mkdir(parents=True, exist_ok=True)
    # Fresh tokenizers, as built in code: calling the pipeline (--probe) leaves padding state in the fast
    # tokenizers, which save_pretrained would write into tokenizer.json.
    pipe.register_modules(tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), tokenizer_3=t5_tokenizer())
    for name, module in trainable_modules(pipe).items():
        torch.nn.Module.to(module, "cpu", storage_dtype(name))  # diffusers' .to() warns about a float32 list these lack
    pipe.save_pretrained(out, safe_serialization=True)
    for module in trainable_modules(pipe).values():
        torch.nn.Module.float(module)
    (out / "training_log.json").write_text(json.dumps(meta) + "\n")
    plot_losses(meta, out / "loss_curve.png")
    (out / "README.md").write_text(model_card(pipe, meta))
    return out


def model_card(pipe, meta: dict) -> str:
    config, settings = meta["config"], meta["settings"]
    counts = {name: parameter_count(m) for name, m in trainable_modules(pipe).items()}
    tr_loss = meta.get("transformer_loss") or [[0, float("nan"), 0]]
    tail = [row[1] for row in tr_loss[-20:]]
    pairs = ", ".join(f"{c} {s}" for c, s in sorted(data.HELD_OUT_PAIRS))
    text_encoders = "trained with the transformer" if settings["train_text_encoders"] else "frozen at their seeded random initialisation"
    resolutions = "/".join(str(r) for r in sorted(set(settings.get("resolutions", RESOLUTION_CYCLE))))
    factors = (f"`scaling_factor` {pipe.vae.config.scaling_factor:.4f} and `shift_factor` "
               f"{pipe.vae.config.shift_factor:.4f}")
    runs = training_runs(meta)
    vae_runs = [run for run in runs if run["vae_iterations"]]
    if vae_runs:
        vae_line = (f"- **VAE**: {total(vae_runs, 'vae_iterations')} iterations, batch {settings['vae_batch']} at 128 px "
                    f"cycling through {resolutions} px (x2 at 64, x0.5 at 256), L1 + MSE + {settings['kl_weight']:g} x KL; final reconstruction loss "
                    f"{vae_runs[-1]['vae_loss_end']:.4f}. {factors} from the statistics of 1024 training latents.")
    else:
        vae_line = f"- **VAE**: kept from the starting model ({factors})."
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion-3, tiny, synthetic-data]
---

# tiny-shapes: a tiny SD3 pipeline trained on synthetic coloured shapes

A {sum(counts.values()) / 1e6:.1f} M-parameter `StableDiffusion3Pipeline` made of stock diffusers / transformers classes
(SD3Transformer2DModel {counts['transformer'] / 1e6:.2f} M, AutoencoderKL {counts['vae'] / 1e6:.2f} M with 16 latent channels,
two CLIPTextModelWithProjection {counts['text_encoder'] / 1e6:.2f} M each, T5EncoderModel {counts['text_encoder_3'] / 1e6:.2f} M),
stored in bf16 (the two CLIP encoders, 2% of the bytes, in float32). It is trained to draw what captions of this grammar say:

    a [small|large] <colour> <shape> [on the left|right|top|bottom] on a <colour> background
    a <colour> <shape> and a <colour> <shape> on a <colour> background

colours red, green, blue, yellow, orange, purple, white, black; shapes circle, square, triangle. Other words are
not understood. Native size {config['native_size']}x{config['native_size']}; also trained at 64 and 256.

```python
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained("path/to/tiny-shapes")
image = pipe("a red circle on a blue background", height=128, width=128, num_inference_steps={SHAPES_STEPS},
             guidance_scale={SHAPES_GUIDANCE}).images[0]
```

## Training

- **Data**: rendered in code by `shapes/data.py` (anti-aliased signed distances, no download), a fresh random
  scene for every sample. Held out and never trained on: single-object captions of the pairs {pairs}, and every
  caption whose CRC-32 is divisible by 10.
{vae_line}
- **Transformer**: SD3's rectified flow (logit-normal sigmas, velocity target), {total(runs)}
  iterations in all, batch {settings['batch']} at 128 px cycling through {resolutions} px (x2 at 64, x0.5 at 256), AdamW with warm-up and
  cosine decay per run, EMA {settings['ema']}, caption dropout {settings['cfg_dropout']} for classifier-free guidance. Text
  encoders {text_encoders}. Final loss (mean of the last logged values) {sum(tail) / len(tail):.4f}.
{_probe_line(meta)}- **Where**: `python -m shapes.train` (seed {settings['seed']}), {_runs_summary(runs)}:

{_runs_table(runs)}

  Loss curves of the last run: `loss_curve.png`; every logged value and each run's settings: `training_log.json`.
"""


def training_runs(meta: dict) -> list[dict]:
    """Every training run that made these weights, oldest first: those of the model it started from, then its own."""
    settings = meta.get("settings", {})
    vae_loss = meta.get("vae_loss")
    own = {"device": meta.get("device", "?"), "seconds": round(meta.get("seconds", 0)),
           "vae_iterations": meta.get("vae_iterations_done", 0), "vae_loss_end": vae_loss[-1][1] if vae_loss else None,
           "iterations": meta.get("iterations_done", 0), "batch": settings.get("batch"), "lr": settings.get("lr"),
           "compile": settings.get("compile", False), "cuda_graphs": meta.get("cuda_graphs", False),
           # logs written before "kernels" was recorded come from warn-only deterministic mode
           "kernels": meta.get("kernels", "warn-only" if settings.get("deterministic", True) else "non-deterministic"),
           "probe": meta.get("probe"),
           "segments": meta.get("segments", [])}
    return [*meta.get("init_from", {}).get("runs", []), own]


def _runs_summary(runs: list[dict]) -> str:
    minutes = f"{sum(r['seconds'] for r in runs) / 60:.1f} minutes"
    if len(runs) == 1:
        parts = runs[0].get("segments", [])
        if len(parts) > 1:  # stopped by --stop-after and continued from --state-dir
            return (f"one run, {minutes}, in {len(parts)} processes ({' + '.join(f'{p:.0f}' for p in parts)} s: stopped "
                    "with `--stop-after` and continued from its saved state, `--state-dir`)")
        return f"one run, {minutes}"
    return f"{len(runs)} runs, each starting from the weights the one before wrote (`--init-from`), {minutes} in all"


def _runs_table(runs: list[dict]) -> str:
    rows = ["  | run | where | VAE iterations | transformer iterations | lr | kernels | seconds | probe: train / held-out |",
            "  | --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for number, run in enumerate(runs, 1):
        kernels = ("compiled" if run["compile"] else "CUDA graphs" if run.get("cuda_graphs") else "eager") + ", " + {
            "deterministic": "deterministic kernels",
            "warn-only": "deterministic mode, warnings only (cuDNN attention's backward is not deterministic)",
        }.get(run["kernels"], run["kernels"])
        found = run.get("probe")
        probe_text = f"{found['train']}% / {found['heldout']}% (guidance {found['guidance']:g})" if found else "-"
        rows.append(f"  | {number} | {run['device']} | {run['vae_iterations']} | {run['iterations']} | {run['lr']:g} | {kernels} "
                    f"| {run['seconds']} | {probe_text} |")
    return "\n".join(rows)


def _probe_line(meta: dict) -> str:
    found = meta.get("probe")
    if not found:
        return ""
    return (f"- **Quick check after training** (`--probe`): the analytic detector (`shapes/detector.py`) read "
            f"{found['train']}% of training captions and {found['heldout']}% of held-out captions back correctly "
            f"({found['steps']} steps, guidance {found['guidance']}, {found['size']} px): a quick check on a few dozen "
            "captions. The full evaluation, 16-bit vs FP8 on 200 held-out captions with three seeds each (what the "
            "90% target is measured on), is `python -m bench.eval_shapes --seeds 3` in the project that ships this "
            "model; its figures are in the project's README.\n")


def plot_losses(meta: dict, path: Path) -> None:
    """Loss curves (log scale) as a PNG, drawn with PIL: VAE reconstruction and transformer flow loss."""
    from PIL import Image, ImageDraw

    panels = [("VAE reconstruction loss (L1+MSE)", [(r[0], r[1]) for r in meta.get("vae_loss", [])]),
              ("transformer rectified-flow loss", [(r[0], r[1]) for r in meta.get("transformer_loss", [])])]
    width, height, margin = 900, 340, 58
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panel_w = width // 2
    for index, (title, points) in enumerate(panels):
        x0, x1, y0, y1 = index * panel_w + margin, (index + 1) * panel_w - 16, 30, height - 40
        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        draw.text((x0, 10), title, fill="black")
        points = [(x, y) for x, y in points if y > 0 and math.isfinite(y)]
        if len(points) < 2:
            draw.text((x0 + 10, y0 + 10), "no data", fill="gray")
            continue
        smoothed, running = [], None
        for x, y in points:
            running = y if running is None else 0.9 * running + 0.1 * y
            smoothed.append((x, running))
        xs = [p[0] for p in points]
        logs = [math.log10(p[1]) for p in points]
        lo, hi = min(logs), max(logs)
        hi = hi if hi > lo else lo + 1

        def to_px(x, y):
            return (x0 + (x - xs[0]) / max(1, xs[-1] - xs[0]) * (x1 - x0),
                    y1 - (math.log10(y) - lo) / (hi - lo) * (y1 - y0))

        draw.line([to_px(x, y) for x, y in points], fill=(170, 200, 235), width=1)
        draw.line([to_px(x, y) for x, y in smoothed], fill=(20, 80, 180), width=2)
        for k in range(5):
            value = lo + (hi - lo) * k / 4
            py = y1 - (y1 - y0) * k / 4
            draw.line([x0 - 4, py, x0, py], fill="black")
            draw.text((x0 - margin + 4, py - 6), f"{10 ** value:.3g}", fill="black")
        draw.text((x0, y1 + 6), f"{xs[0]}", fill="black")
        draw.text((x1 - 40, y1 + 6), f"{xs[-1]} it", fill="black")
    image.save(path)


# --------------------------------------------------------------------------------------------------- CLI


def total(runs: list[dict], key: str = "iterations") -> int:
    """A model's iterations (or VAE iterations) summed over the training runs that made it."""
    return sum(run[key] for run in runs)


def load_weights(pipe, folder: Path) -> dict:
    """Load a pipeline folder's weights (and VAE latent factors) into `pipe`; returns what it says of its training."""
    for name, module in trainable_modules(pipe).items():
        if name in ("transformer", "vae"):
            loaded = type(module).from_pretrained(folder, subfolder=name, dtype=torch.float32)
        else:  # transformers: from_pretrained restores tied weights (T5's embeddings)
            loaded = type(module).from_pretrained(folder / name, dtype=torch.float32)
        module.load_state_dict(loaded.state_dict())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    pipe.vae.register_to_config(scaling_factor=vae["scaling_factor"], shift_factor=vae["shift_factor"])
    log = folder / "training_log.json"
    runs = training_runs(json.loads(log.read_text())) if log.is_file() else []
    return {"folder": str(folder), "runs": runs, "vae_iterations": total(runs, "vae_iterations"),
            "iterations": total(runs)}


def set_kernels(device: torch.device, deterministic: bool) -> None:
    """Training's kernel settings: TF32 on CUDA, and either deterministic kernels only (an operation without a
    deterministic implementation raises and names itself) or cuDNN's benchmarked, fastest choices."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read at its first use
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def kernel_mode() -> str:
    """How deterministic the kernels of this process are: "deterministic", "warn-only" or "non-deterministic"."""
    if not torch.are_deterministic_algorithms_enabled():
        return "non-deterministic"
    return "warn-only" if torch.is_deterministic_algorithms_warn_only_enabled() else "deterministic"


def train(config: ModelConfig, settings: TrainSettings, out: Path, device: torch.device,
          checkpoint_dir: Path | None = None, checkpoint_every: float = 120.0, init_from: Path | None = None,
          state_dir: Path | None = None):
    """Train a pipeline (from scratch, or on from the weights in `init_from`) and write it to `out`; returns
    (pipeline, meta), or None when `settings.stop_after` stopped it (its state is then in `state_dir`)."""
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    set_kernels(device, settings.deterministic)
    started = time.perf_counter()
    pipe = build_pipeline(config)
    pipe.set_progress_bar_config(disable=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    log = {"device": name, "torch": torch.__version__, "phase": "vae", "kernels": kernel_mode()}
    if init_from:
        log["init_from"] = load_weights(pipe, init_from)
        print(f"starting from {init_from} ({log['init_from']['iterations']} transformer iterations)", flush=True)
    checkpoint = Checkpointer(checkpoint_dir, checkpoint_every, config, settings)
    print(f"training on {name}; parameters: " + ", ".join(f"{n} {parameter_count(m) / 1e6:.2f}M" for n, m in trainable_modules(pipe).items()), flush=True)
    state = TrainingState(state_dir, config) if state_dir else None
    if state and state.exists():
        log = state.read(settings)
        state.restore_vae(pipe)
        print(f"continuing the run stopped in {state_dir} at transformer iteration {state.info['step']}", flush=True)
    else:
        if settings.vae_iterations > 0 or not init_from:
            train_vae(pipe, settings, device, log, checkpoint)
        else:
            log["vae_iterations_done"] = 0  # the VAE (and its latent factors) as loaded
        log["vae_seconds"] = time.perf_counter() - started
        log["phase"] = "transformer"
    if not train_transformer(pipe, settings, device, log, checkpoint, state):
        return None
    log["phase"] = "done"
    log["segments"] = _segments(log)
    log["seconds"] = sum(log["segments"])  # seconds of this process (and of the ones a resumed run continues)
    if state:
        state.remove()
    checkpoint.write(pipe, log)
    if settings.probe:
        log["probe"] = probe(pipe, device, settings.probe)
        checkpoint.write(pipe, log)
    meta = dict(log, config=config.to_dict(), settings=vars(settings),
                vae_factors=_vae_factors(pipe))
    write_pipeline(pipe, out, meta)
    print(f"wrote {out} ({log['seconds']:.0f} s)", flush=True)
    return pipe, meta


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(prog="python -m shapes.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=CONFIGS, default="default",
                        help="model size (small: quick CPU trials; tiny: tests)")
    parser.add_argument("--iterations", type=int,
                        help=f"transformer iterations (default {defaults.iterations}; with --time-limit, as many as fit)")
    parser.add_argument("--vae-iterations", type=int,
                        help=f"VAE iterations (default {defaults.vae_iterations}; with --time-limit, as many as fit)")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--vae-batch", type=int, default=defaults.vae_batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--vae-lr", type=float, default=defaults.vae_lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--cfg-dropout", type=float, default=defaults.cfg_dropout)
    parser.add_argument("--ema", type=float, default=defaults.ema, help="EMA decay of the weights (0: no EMA)")
    parser.add_argument("--train-text-encoders", action="store_true",
                        help="train the text encoders with the transformer (default: frozen at their seeded init)")
    parser.add_argument("--time-limit", type=float,
                        help="seconds for VAE + transformer: each phase measures its speed early and runs as many of its "
                        "iterations as fit (the counts are printed and logged: rerun with them to reproduce)")
    parser.add_argument("--vae-share", type=float, default=defaults.vae_share)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--resolutions", default=",".join(map(str, RESOLUTION_CYCLE)),
                        help="training resolutions, one per iteration, cycled (default: %(default)s)")
    parser.add_argument("--no-deterministic", action="store_true",
                        help="allow non-deterministic (faster) CUDA kernels; runs stay seeded")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer's training step instead of CUDA graphs (measured before the "
                        "graphs existed: 138 vs 163 ms an eager iteration at batch 256, after ~4 minutes of compiling "
                        "the three training shapes on a cold H200)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="run the transformer's training step eagerly instead of replaying it as CUDA graphs")
    parser.add_argument("--probe", type=int, default=0, metavar="N",
                        help="after training, print the detector's caption accuracy on N training and N held-out captions")
    parser.add_argument("--checkpoint-dir", type=Path, help="also write weights + log here every --checkpoint-every s")
    parser.add_argument("--checkpoint-every", type=float, default=120.0)
    parser.add_argument("--from-checkpoint", type=Path,
                        help="write --out from this checkpoint folder; no training (--probe still scores it)")
    parser.add_argument("--state-dir", type=Path,
                        help="where a run stopped by --stop-after keeps its full training state; the same command "
                        "with the same folder continues it, and the weights then equal those of an uninterrupted run")
    parser.add_argument("--stop-after", type=float, metavar="SECONDS",
                        help="once this many seconds of this process have passed (checked after each transformer "
                        "iteration), write the state to --state-dir and stop, for machines that cap how long one command "
                        "may run")
    parser.add_argument("--init-from", type=Path, metavar="PIPELINE",
                        help="start from this pipeline folder's weights (same config), e.g. the shipped model; with "
                        "--vae-iterations 0 its VAE is kept as it is")
    return parser


def settings_from(args: argparse.Namespace) -> TrainSettings:
    """The `TrainSettings` of parsed command-line arguments. A phase's iteration count not given is, with
    `--time-limit`, unbounded (the limit decides how many fit), else the default."""
    def count(given: int | None, default: int) -> int:
        return given if given is not None else UNBOUNDED if args.time_limit else default

    return TrainSettings(
        iterations=count(args.iterations, TrainSettings.iterations),
        vae_iterations=count(args.vae_iterations, TrainSettings.vae_iterations),
        batch=args.batch, vae_batch=args.vae_batch,
        lr=args.lr, vae_lr=args.vae_lr, warmup=args.warmup, cfg_dropout=args.cfg_dropout, ema=args.ema,
        train_text_encoders=args.train_text_encoders, time_limit=args.time_limit, vae_share=args.vae_share,
        seed=args.seed, log_every=args.log_every, resolutions=tuple(int(r) for r in args.resolutions.split(",")), probe=args.probe,
        deterministic=not args.no_deterministic, compile=args.compile, cuda_graphs=not args.no_cuda_graphs,
        stop_after=args.stop_after,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_checkpoint:
        pipe, meta = load_checkpoint(args.from_checkpoint)
        pipe.set_progress_bar_config(disable=True)
        if args.probe:
            meta["probe"] = probe(pipe, torch.device(args.device), args.probe)
        write_pipeline(pipe, args.out, meta)
        print(f"wrote {args.out} from {args.from_checkpoint}")
        return 0
    if args.stop_after is not None and not args.state_dir:
        raise BadInput("--stop-after needs --state-dir: the folder where the stopped run's state is kept")
    config, settings = CONFIGS[args.config](), settings_from(args)
    train(config, settings, args.out, torch.device(args.device), args.checkpoint_dir, args.checkpoint_every,
          args.init_from, args.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
