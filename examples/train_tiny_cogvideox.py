"""Train a tiny CogVideoXTransformer3DModel on latent shards made by `latentcache encode`.

The proof that a trainer works on the shards: diffusers' CogVideoX scheduler, v-prediction (or epsilon) loss,
`LatentShardDataset.for_transformer` refusing data that does not fit the model, and a resumable data position in
the checkpoint. The model is tiny (random init, CPU-friendly); the loop is the one a real run uses.

    # latents from your videos with the built-in tiny random VAE (CPU, seconds)
    latentcache encode videos/ --out latents --vae tiny-random-cogvideox --frames 17 --height 64 --width 96
    # one process (CPU or one GPU)
    python examples/train_tiny_cogvideox.py --data latents --steps 300 --checkpoint runs/ckpt.pt
    # one node, 8 GPUs: each rank reads its own shards (LatentShardDataset reads RANK/WORLD_SIZE)
    torchrun --nproc_per_node 8 examples/train_tiny_cogvideox.py --data latents --steps 300
    # resume from the checkpoint it wrote: the data continues where it stopped
    python examples/train_tiny_cogvideox.py --data latents --steps 600 --resume runs/ckpt.pt
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from latentcache import LatentShardDataset
from latentcache.dataset import StatefulLoader, bucket_latent_shape  # the public path trainers use

log = logging.getLogger("train_tiny_cogvideox")
TEXT_TOKENS, TEXT_DIM = 8, 32


@dataclass(slots=True)
class TrainResult:
    losses: list[float] = field(default_factory=list)
    eval_before: float = 0.0
    eval_after: float = 0.0


def make_scheduler(prediction: str):
    from diffusers import CogVideoXDDIMScheduler

    # CogVideoX-2b's training noise schedule (zero terminal SNR, shifted), as in its scheduler_config.json.
    return CogVideoXDDIMScheduler(prediction_type=prediction, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, rescale_betas_zero_snr=True, snr_shift_scale=3.0,
                                  timestep_spacing="trailing", clip_sample=False)


def make_model(latent_shape: tuple[int, int, int, int], temporal_compression: int, seed: int = 0):
    """A 2-layer CogVideoX transformer sized for latents [C, T, H, W]."""
    from diffusers import CogVideoXTransformer3DModel

    c, t, h, w = latent_shape
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=c, out_channels=c, num_layers=2,
        text_embed_dim=TEXT_DIM, time_embed_dim=16, max_text_seq_length=TEXT_TOKENS, patch_size=2,
        sample_frames=(t - 1) * temporal_compression + 1, sample_height=h, sample_width=w,
        temporal_compression_ratio=temporal_compression,
    )


def diffusion_loss(model, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   text: torch.Tensor) -> torch.Tensor:
    """latents [B, T, C, H, W], normalised by the dataset: the usual noise- or v-prediction MSE."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = model(hidden_states=noisy, encoder_hidden_states=text, timestep=timesteps).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def fixed_eval(model, scheduler, batches: list[torch.Tensor], text: torch.Tensor, seed: int = 1234) -> float:
    """The loss on fixed (noise, timestep) draws, so two evaluations compare the model and nothing else."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for latents in batches:
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        timesteps = torch.linspace(50, 950, latents.shape[0]).long().to(latents.device)
        total += float(diffusion_loss(model, scheduler, latents, noise, timesteps, text[: len(latents)]))
    return total / len(batches)


def train(data: str | os.PathLike, *, steps: int = 300, batch_size: int = 4, lr: float = 1e-3,
          prediction: str = "v_prediction", seed: int = 0, num_workers: int = 0, sample_posterior: bool = True,
          checkpoint: Path | None = None, resume: Path | None = None, log_every: int = 50) -> TrainResult:
    probe = LatentShardDataset(data)
    bucket = sorted({s.bucket for s in probe.shards})[0]
    model = make_model(bucket_latent_shape(probe.spec, bucket), probe.spec.temporal_compression, seed)
    # The guard: refuses shards whose channels, frames or size do not fit this model, naming each number.
    dataset = LatentShardDataset.for_transformer(model, data, batch_size=batch_size, layout="BTCHW", shuffle=True,
                                                 resampled=True, seed=seed, sample_posterior=sample_posterior)
    loader = StatefulLoader(dataset, num_workers=num_workers)
    device = _device()
    model.to(device)
    scheduler = make_scheduler(prediction)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    if resume is not None:
        state = torch.load(resume, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["data"][_rank()])  # each rank continues its own shards
        start = int(state["step"])
    # No text encoder in this example: an unconditional model (a real run feeds the cached prompt_embeds).
    text = torch.zeros(batch_size, TEXT_TOKENS, TEXT_DIM, device=device)
    eval_batches = [next(iter(LatentShardDataset(data, batch_size=batch_size, layout="BTCHW",
                                                 sample_posterior=False)))["latents"].to(device)]
    net = model
    if torch.distributed.is_initialized():
        # Gradients are averaged across ranks; each rank's LatentShardDataset reads its own shards.
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    result = TrainResult(eval_before=fixed_eval(model.eval(), scheduler, eval_batches, text))
    model.train()
    gen = torch.Generator().manual_seed(seed + start)
    step = start
    # Stop right after the last step, before the loader hands out (and counts as delivered) one batch more.
    for batch in (loader if step < steps else ()):
        latents = batch["latents"].to(device, non_blocking=True)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen).to(device)
        loss = diffusion_loss(net, scheduler, latents, noise, timesteps, text[: len(latents)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        result.losses.append(loss.item())
        step += 1
        if log_every and step % log_every == 0:
            log.info("step %d loss %.4f", step, sum(result.losses[-log_every:]) / len(result.losses[-log_every:]))
        if step >= steps:
            break
    result.eval_after = fixed_eval(model.eval(), scheduler, eval_batches, text)
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, optimizer, loader, step)
    return result


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_checkpoint(path: Path, model, optimizer, loader: StatefulLoader, step: int) -> None:
    """Rank 0 writes model, optimizer and every rank's data position (each rank reads its own shards)."""
    data = [loader.state_dict()]
    if torch.distributed.is_initialized():
        data = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(data, loader.state_dict())
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "data": data, "step": step},
                   path)


def _device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="latentcache output directory (or shard urls)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prediction", default="v_prediction", choices=["v_prediction", "epsilon"])
    p.add_argument("--workers", type=int, default=0)
    # No default: a demo run must not leave a file in whatever directory it was started from.
    p.add_argument("--checkpoint", type=Path, default=None, help="where to save the final checkpoint (default: none)")
    p.add_argument("--resume", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    result = train(args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, prediction=args.prediction,
                   num_workers=args.workers, checkpoint=args.checkpoint, resume=args.resume)
    if _rank() == 0:
        print(f"fixed-noise eval loss: {result.eval_before:.4f} before, {result.eval_after:.4f} after "
              f"{len(result.losses)} steps" + (f"; checkpoint {args.checkpoint}" if args.checkpoint else ""))
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
