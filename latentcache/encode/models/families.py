"""Everything that differs between VAE families, one `FAMILIES` record each: the diffusers class, where the
normalisation is read from (config or weights), how the encoder tiles, a tiny config for tests, the transformer
trained on its latents. Adding a family adds one entry here (and, for image-to-video, one line in
`format.spec.IMAGE_CONDITIONS`; for `--text-encoder`, one in `text_families.TEXT_FAMILIES`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from latentcache.encode.settings import TilingSettings
from latentcache.errors import ConfigError
from latentcache.format.buckets import FrameRule
from latentcache.format.spec import LatentSpec

TilingStyle = Literal["overlap", "stride", "widened"]


@dataclass(slots=True, frozen=True)
class TilingAdapter:
    """How diffusers tiles a family's encoder spatially, and how latentcache switches that on for a TilingSettings.

    style "overlap" (CogVideoX): tile size and an overlap factor, blended tiles concatenated as they are; "stride"
    (the others): tile size and a stride in pixels, the result cropped to size. `tile_problem` checks exactness
    per style.
    """

    style: TilingStyle
    enable: Callable[[Any, TilingSettings], None]


def _enable_overlap_tiling(model: Any, tiling: TilingSettings) -> None:
    model.enable_tiling(
        tile_sample_min_height=tiling.tile_height,
        tile_sample_min_width=tiling.tile_width,
        tile_overlap_factor_height=tiling.overlap,
        tile_overlap_factor_width=tiling.overlap,
    )
    # diffusers treats overlap 0 as "unset" (`or` default); force the value we validated.
    model.tile_overlap_factor_height = model.tile_overlap_factor_width = tiling.overlap


def _enable_stride_tiling(model: Any, tiling: TilingSettings, patch: int = 1) -> None:
    sizes = {}
    for axis, tile in (("height", tiling.tile_height), ("width", tiling.tile_width)):
        sizes[f"tile_sample_min_{axis}"] = tile // patch
        sizes[f"tile_sample_stride_{axis}"] = int(tile * (1 - tiling.overlap)) // patch
    model.enable_tiling(**sizes)


def _enable_patched_stride_tiling(model: Any, tiling: TilingSettings) -> None:
    # Wan 2.2 tiles after patchifying the input, so its tile sizes are in patchified pixels (Wan 2.1: patch 1).
    _enable_stride_tiling(model, tiling, patch=model.config.get("patch_size") or 1)


def _enable_single_overlap_tiling(model: Any, tiling: TilingSettings) -> None:
    # HunyuanVideo 1.5: one overlap factor for both axes and the latent tile size given separately; it blends and
    # concatenates like CogVideoX (no crop), so the same exactness rule holds.
    spatial = int(model.spatial_compression_ratio)
    model.enable_tiling(
        tile_sample_min_height=tiling.tile_height,
        tile_sample_min_width=tiling.tile_width,
        tile_latent_min_height=tiling.tile_height // spatial,
        tile_latent_min_width=tiling.tile_width // spatial,
    )
    model.tile_overlap_factor = tiling.overlap  # diffusers treats 0 as "unset" (`or` default)


def _enable_widened_tiling(model: Any, tiling: TilingSettings) -> None:
    # MiniMax-H3: tile size and a minimum overlap in pixels, which diffusers widens in whole latents until the tiles
    # cover the frame exactly (`_split_tiles`); blended, then cropped.
    model.enable_tiling(tile_sample_min_height=tiling.tile_height, tile_sample_min_width=tiling.tile_width)
    # Set directly: diffusers treats an overlap of 0 as "unset" (`or` default).
    model.tile_sample_min_overlap_height = int(tiling.tile_height * tiling.overlap)
    model.tile_sample_min_overlap_width = int(tiling.tile_width * tiling.overlap)


OVERLAP_TILING = TilingAdapter("overlap", _enable_overlap_tiling)


SINGLE_OVERLAP_TILING = TilingAdapter("overlap", _enable_single_overlap_tiling)


STRIDE_TILING = TilingAdapter("stride", _enable_stride_tiling)


PATCHED_STRIDE_TILING = TilingAdapter("stride", _enable_patched_stride_tiling)


WIDENED_TILING = TilingAdapter("widened", _enable_widened_tiling)


@dataclass(slots=True, frozen=True)
class PixelConvention:
    """What the encoder takes for RGB pixels in [0, 1]: (x - mean) / std per channel. Every family but MiniMax-H3
    takes [-1, 1] (mean = std = 0.5), which VideoVAE computes as x / 127.5 - 1 (`pixels=None`)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(slots=True, frozen=True)
class VAEFamily:
    """Everything that differs between VAE families; adding a family adds one `FAMILIES` entry.

    (How a family's image-to-video conditioning is stored is part of the on-disk format, which readers rebuild
    without this module: `format.spec.IMAGE_CONDITIONS`.)
    """

    name: str
    class_name: str
    default_source: str
    default_subfolder: str | None
    tiny_config: dict[str, Any]
    # Builds the spec from a loaded model: its config, plus the weights where a family keeps its normalisation
    # there (LTX-Video registers latents_mean/latents_std as buffers, not config fields).
    spec_from_model: Callable[[Any], LatentSpec]
    # How diffusers tiles this encoder spatially (see TilingAdapter).
    tiling: TilingAdapter = STRIDE_TILING
    # The attribute that sets frames per encoder step, where the encoder has one (CogVideoX only).
    frame_chunk_attr: str | None = None
    # The diffusers transformer trained on these latents, for docs and `for_transformer` checks.
    transformer_class: str | None = None
    # False where diffusers' encode fails on a batch of more than one clip: VideoVAE.encode then calls it one clip at
    # a time (the same latents, one call per clip), whatever --batch-size says.
    batchable: bool = True
    # How pixels enter the encoder (and leave the decoder); None: [-1, 1].
    pixels: PixelConvention | None = None
    # The released latents are spatially tiled (diffusers' class tiles by default): without --tiling the model's own
    # tiling stays on, never switched off (MiniMax-H3).
    tiled_as_released: bool = False
    # Frames, height and width of a clip when the command line names none: the family's pipeline's own defaults
    # (tested against each pipeline in tests/encode/test_geometry_defaults.py).
    default_clip: tuple[int, int, int] = (49, 480, 720)
    # The spec's geometry (channels, compressions, frame rule) from the VAE's config with its class's defaults filled
    # in, without building the model: the early checks of --frames and sizes, before diffusers is imported. Its
    # normalisation is left unset; only `spec_from_model` knows it (tested to agree in tests/encode/test_vae.py).
    geometry_from_config: Callable[[dict[str, Any]], LatentSpec] | None = None


def _optional_tuple(value: Any) -> tuple[float, ...] | None:
    return tuple(float(v) for v in value) if value is not None else None


def _cogvideox_spec(model: Any) -> LatentSpec:
    config = model.config
    # The geometry is the config's arithmetic (`_cogvideox_geometry`); the normalisation is added here.
    return dataclasses.replace(
        _cogvideox_geometry(config),
        scaling_factor=float(config.scaling_factor),
        shift_factor=None if config.shift_factor is None else float(config.shift_factor),
        latents_mean=_optional_tuple(config.latents_mean),
        latents_std=_optional_tuple(config.latents_std),
        invert_scale_latents=bool(getattr(config, "invert_scale_latents", False)),
    )


def _wan_spec(model: Any) -> LatentSpec:
    config = model.config
    return dataclasses.replace(
        _wan_geometry(config),
        # WanPipeline: (z - latents_mean) * (1 / latents_std); there is no scaling factor.
        latents_mean=_optional_tuple(config.latents_mean),
        latents_std=_optional_tuple(config.latents_std),
    )


def _hunyuan_spec(model: Any) -> LatentSpec:
    config = model.config
    return dataclasses.replace(_config_ratios_geometry("hunyuanvideo")(config),
                               scaling_factor=float(config.scaling_factor))


def _ltx_spec(model: Any) -> LatentSpec:
    config = model.config
    return LatentSpec(
        family="ltx",
        channels=int(config.latent_channels),
        # Derived by the model from patch sizes and its down blocks unless the config sets them; LTXPipeline reads
        # these attributes too.
        temporal_compression=int(model.temporal_compression_ratio),
        spatial_compression=int(model.spatial_compression_ratio),
        scaling_factor=float(config.scaling_factor),
        # LTXPipeline._normalize_latents: (z - latents_mean) * scaling_factor / latents_std, from the buffers, read
        # by load_vae before the model is cast to the encode dtype (so in the weights' own precision).
        latents_mean=tuple(float(v) for v in model.latents_mean.float().cpu()),
        latents_std=tuple(float(v) for v in model.latents_std.float().cpu()),
    )


def _mochi_spec(model: Any) -> LatentSpec:
    config = model.config
    return LatentSpec(
        family="mochi",
        channels=int(config.latent_channels),
        # The products of temporal_expansions (1*2*3 = 6) and spatial_expansions (2*2*2 = 8), as MochiPipeline reads.
        temporal_compression=int(model.temporal_compression_ratio),
        spatial_compression=int(model.spatial_compression_ratio),
        # MochiPipeline decodes `z * latents_std / scaling_factor + latents_mean`: the inverse is
        # (z - latents_mean) * scaling_factor / latents_std, per channel from the config.
        scaling_factor=float(config.scaling_factor),
        latents_mean=_optional_tuple(config.latents_mean),
        latents_std=_optional_tuple(config.latents_std),
    )


def _hunyuan15_spec(model: Any) -> LatentSpec:
    config = model.config
    # HunyuanVideo15ImageToVideoPipeline: image_latents * scaling_factor; decode: latents / scaling_factor.
    return dataclasses.replace(_config_ratios_geometry("hunyuanvideo15")(config),
                               scaling_factor=float(config.scaling_factor))


def _minimax_h3_spec(model: Any) -> LatentSpec:
    config = model.config
    # `clip_length` frames per encoder chunk, `tokens_chunk_size` latent frames each, `token_drop` dropped at the end:
    # clip_length * n + chunk frames -> chunk * n + (chunk - token_drop) latent frames (17n+5 -> 5n+2), what
    # MiniMaxH3ModularPipeline's align_num_frames / video_latent_num_frames compute from the same attributes.
    chunk = int(model.tokens_chunk_size)
    rule = FrameRule(int(config.clip_length), chunk, chunk, chunk - int(config.token_drop))
    return LatentSpec(
        family="minimax-h3",
        channels=int(config.latent_channels),
        temporal_compression=int(model.temporal_compression_ratio),
        spatial_compression=int(model.spatial_compression_ratio),
        # The pipeline's encode_vae_condition: (z - latents_mean) / latents_std, per channel from the config.
        latents_mean=_optional_tuple(config.latents_mean),
        latents_std=_optional_tuple(config.latents_std),
        frame_mapping=str(rule),
    )


def _ltx2_spec(model: Any) -> LatentSpec:
    # LTX2Pipeline._normalize_latents is LTX-Video's formula, on the same kind of weights buffers.
    return dataclasses.replace(_ltx_spec(model), family="ltx2")


def _geometry(family: str, channels: Any, temporal: Any, spatial: Any, rule: FrameRule | None = None) -> LatentSpec:
    return LatentSpec(family=family, channels=int(channels), temporal_compression=int(temporal),
                      spatial_compression=int(spatial), frame_mapping=None if rule is None else str(rule))


# What each class's constructor derives from its config (diffusers 0.42), as the `_*_spec` functions above read it
# off the built model.
def _cogvideox_geometry(c: dict[str, Any]) -> LatentSpec:
    # What CogVideoXPipeline uses: one 2x downsample per block after the first.
    return _geometry("cogvideox", c["latent_channels"], c["temporal_compression_ratio"],
                     2 ** (len(c["block_out_channels"]) - 1))


def _wan_geometry(c: dict[str, Any]) -> LatentSpec:
    # Old configs lack the scale factors; the encoder's own downsampling schedule gives the same numbers.
    temporal = c.get("scale_factor_temporal") or 2 ** sum(c["temperal_downsample"])
    spatial = c.get("scale_factor_spatial") or 2 ** (len(c["dim_mult"]) - 1) * (c.get("patch_size") or 1)
    return _geometry("wan", c["z_dim"], temporal, spatial)


def _config_ratios_geometry(family: str) -> Callable[[dict[str, Any]], LatentSpec]:
    # HunyuanVideo and HunyuanVideo 1.5: both ratios are config fields.
    return lambda c: _geometry(family, c["latent_channels"], c["temporal_compression_ratio"],
                               c["spatial_compression_ratio"])


def _ltx_geometry(family: str) -> Callable[[dict[str, Any]], LatentSpec]:
    # AutoencoderKLLTXVideo and AutoencoderKLLTX2Video: patch sizes times the spatio-temporal down blocks, unless the
    # config sets the ratios.
    def geometry(c: dict[str, Any]) -> LatentSpec:
        scaled = 2 ** sum(bool(s) for s in c["spatio_temporal_scaling"])
        temporal, spatial = c.get("temporal_compression_ratio"), c.get("spatial_compression_ratio")
        return _geometry(family, c["latent_channels"], temporal if temporal is not None else c["patch_size_t"] * scaled,
                         spatial if spatial is not None else c["patch_size"] * scaled)
    return geometry


def _mochi_geometry(c: dict[str, Any]) -> LatentSpec:
    return _geometry("mochi", c["latent_channels"], math.prod(c["temporal_expansions"]),
                     math.prod(c["spatial_expansions"]))


def _minimax_h3_geometry(c: dict[str, Any]) -> LatentSpec:
    temporal = math.prod(c["temporal_downsample_factors"])
    chunk = math.ceil(int(c["clip_length"]) / temporal)  # the model's tokens_chunk_size
    rule = FrameRule(int(c["clip_length"]), chunk, chunk, chunk - int(c["token_drop"]))
    return _geometry("minimax-h3", c["latent_channels"], temporal, math.prod(c["spatial_downsample_factors"]), rule)


# VAEs latentcache refuses, by diffusers class, with the reason (`--vae` naming one is a ConfigError saying it).
UNSUPPORTED: dict[str, str] = {
    "AutoencoderKLCosmos": "its encode returns an IdentityDistribution (a deterministic latent), not a Gaussian "
    "posterior with mean and log-variance, and latentcache stores the posterior; Cosmos-Predict2 uses the Wan 2.1 VAE "
    "(AutoencoderKLWan), which latentcache supports as the wan family",
    "AutoencoderKLAllegro": "diffusers encodes it only through fixed 24x256x256 tiles (its untiled encode raises "
    "NotImplementedError), so its frame and size rules are not the k*n+1 frames and free tiling latentcache "
    "checks and sets",
}


# Tiny configs keep each family's real architecture (the number of down blocks, hence the compression ratios,
# and the latent channels) with blocks about as narrow as each class allows (Mochi's group norms have a fixed 32
# groups, so its blocks stay 32 wide), so one CPU thread encodes two 17x64x96 clips in well under a second.
FAMILIES: dict[str, VAEFamily] = {
    "cogvideox": VAEFamily(
        name="cogvideox",
        class_name="AutoencoderKLCogVideoX",
        default_source="THUDM/CogVideoX-2b",
        default_subfolder="vae",
        tiny_config=dict(
            block_out_channels=(4, 4, 8, 8),
            layers_per_block=1,
            norm_num_groups=2,
            latent_channels=16,
            temporal_compression_ratio=4,
            sample_height=64,
            sample_width=96,
        ),
        spec_from_model=_cogvideox_spec,
        geometry_from_config=_cogvideox_geometry,
        tiling=OVERLAP_TILING,
        frame_chunk_attr="num_sample_frames_batch_size",
        transformer_class="CogVideoXTransformer3DModel",
        default_clip=(49, 480, 720),  # CogVideoXPipeline: the transformer's sample_frames/height/width x 8
    ),
    "wan": VAEFamily(
        name="wan",
        class_name="AutoencoderKLWan",
        default_source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        default_subfolder="vae",
        # 3 spatial downsamples (8x), 2 of them temporal (4x), 16 channels; the default per-channel mean/std.
        tiny_config=dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                         temperal_downsample=[False, True, True]),
        spec_from_model=_wan_spec,
        geometry_from_config=_wan_geometry,
        tiling=PATCHED_STRIDE_TILING,
        transformer_class="WanTransformer3DModel",
        default_clip=(81, 480, 832),
    ),
    "hunyuanvideo": VAEFamily(
        name="hunyuanvideo",
        class_name="AutoencoderKLHunyuanVideo",
        default_source="hunyuanvideo-community/HunyuanVideo",
        default_subfolder="vae",
        tiny_config=dict(block_out_channels=(4, 4, 8, 8), layers_per_block=1, norm_num_groups=2,
                         latent_channels=16),
        spec_from_model=_hunyuan_spec,
        geometry_from_config=_config_ratios_geometry("hunyuanvideo"),
        transformer_class="HunyuanVideoTransformer3DModel",
        default_clip=(129, 720, 1280),
    ),
    "ltx": VAEFamily(
        name="ltx",
        class_name="AutoencoderKLLTXVideo",
        default_source="Lightricks/LTX-Video",
        default_subfolder="vae",
        # Patch size 4 and three spatio-temporal 2x downsamples: 32x spatial, 8x temporal, 128 channels.
        tiny_config=dict(latent_channels=128, block_out_channels=(8, 8, 16, 16),
                         decoder_block_out_channels=(8, 8, 16, 16), layers_per_block=(1, 1, 1, 1, 1),
                         decoder_layers_per_block=(1, 1, 1, 1, 1)),
        spec_from_model=_ltx_spec,
        geometry_from_config=_ltx_geometry("ltx"),
        transformer_class="LTXVideoTransformer3DModel",
        default_clip=(161, 512, 704),
    ),
    "mochi": VAEFamily(
        name="mochi",
        class_name="AutoencoderKLMochi",
        default_source="genmo/mochi-1-preview",
        default_subfolder="vae",
        # Mochi's own expansions (6x time, 8x space, 12 channels) with narrow blocks and no attention; its group
        # norms use 32 groups, hence 32-wide blocks. No resnets in the full-resolution blocks (the encoder's first,
        # the decoder's last: both read layers_per_block[0]), which were most of its time; the down and up blocks
        # that expand stay.
        tiny_config=dict(encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
                         layers_per_block=(0, 1, 1, 1, 1), add_attention_block=(False,) * 5),
        spec_from_model=_mochi_spec,
        geometry_from_config=_mochi_geometry,
        transformer_class="MochiTransformer3DModel",
        default_clip=(19, 480, 848),
    ),
    "hunyuanvideo15": VAEFamily(
        name="hunyuanvideo15",
        class_name="AutoencoderKLHunyuanVideo15",
        default_source="hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
        default_subfolder="vae",
        # Five blocks: 16x spatial, 4x temporal, 32 channels; the last block is 2 * latent_channels wide, the
        # smallest the encoder's channel-averaging shortcut allows, and the one before it a quarter of that, the
        # smallest its temporal downsampler's shortcut (8 * in / out channels, halved on the first frame) allows.
        tiny_config=dict(block_out_channels=(4, 4, 8, 16, 64), layers_per_block=1),
        spec_from_model=_hunyuan15_spec,
        geometry_from_config=_config_ratios_geometry("hunyuanvideo15"),
        tiling=SINGLE_OVERLAP_TILING,
        # Its mid-block attention (in the released VAE too) expands a [B, N, N] causal mask that
        # scaled_dot_product_attention broadcasts against [B, 1, N, C] queries as [B, B, N, N]: any batch > 1
        # raises (diffusers 0.42), so latentcache encodes its clips one at a time.
        batchable=False,
        transformer_class="HunyuanVideo15Transformer3DModel",
        default_clip=(121, 480, 848),  # HunyuanVideo15Pipeline: 16:9 at its default target size 640
    ),
    "ltx2": VAEFamily(
        name="ltx2",
        class_name="AutoencoderKLLTX2Video",
        default_source="Lightricks/LTX-2",
        default_subfolder="vae",
        # Patch 4 and four down blocks (spatial, temporal, two spatio-temporal): 32x spatial, 8x temporal, 128
        # channels. Without the two ratios in the config the model's fallback (patch * 2 ** #scaling blocks) would
        # say 64x/16x, not what these blocks do; LTX2Pipeline and the spec read the model's attributes, and
        # VideoVAE.encode checks the shape they predict.
        # The decoder widens 2x per up block (its residual upsamplers need that). The first down block has no
        # resnets: the encoder runs its input conv and that block at latent_channels (128) wide on the patchified
        # frames, most of its encode time; the block's downsampler stays, so the compression is the same.
        tiny_config=dict(block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 16, 32),
                         layers_per_block=(0, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                         spatial_compression_ratio=32, temporal_compression_ratio=8),
        spec_from_model=_ltx2_spec,
        geometry_from_config=_ltx_geometry("ltx2"),
        transformer_class="LTX2VideoTransformer3DModel",
        default_clip=(121, 512, 768),  # LTX2Pipeline: 121 frames for checkpoints without a duration head
    ),
    "minimax-h3": VAEFamily(
        name="minimax-h3",
        class_name="AutoencoderKLMiniMaxH3",
        default_source="MiniMaxAI/MiniMax-H3",
        default_subfolder="vae",
        # The real down-sampling schedule (16x spatial, 4x temporal over six blocks), 24 channels, a one-layer ViT
        # decoder; per-channel statistics that are not the identity, so normalising is visible.
        tiny_config=dict(block_out_channels=(4, 4, 8, 8, 8, 8), layers_per_block=1, norm_num_groups=2,
                         decoder_num_layers=1, decoder_num_attention_heads=2, decoder_attention_head_dim=8,
                         decoder_ffn_mult=2, latents_mean=tuple(round(0.05 * (i - 12), 2) for i in range(24)),
                         latents_std=tuple(round(0.5 + 0.05 * i, 2) for i in range(24))),
        spec_from_model=_minimax_h3_spec,
        geometry_from_config=_minimax_h3_geometry,
        tiling=WIDENED_TILING,
        transformer_class="MiniMaxH3Transformer3DModel",
        default_clip=(124, 768, 1344),  # MiniMaxH3Blocks: 124 frames on its 16:9 canvas
        # MiniMaxH3ModularPipeline.pixel_mean / pixel_std: ImageNet's, over [0, 1].
        pixels=PixelConvention(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        tiled_as_released=True,
    ),
}


def family_of(name: str) -> VAEFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown VAE family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def tile_problem(tiling: TilingSettings, spatial: int, style: TilingStyle = "overlap") -> str | None:
    """Why these tile settings would give latents of the wrong size, or None when they are exact.

    style "overlap" (CogVideoX): diffusers steps through the input by int(tile * (1 - overlap)) pixels but keeps
    (tile/spatial - int(tile/spatial * overlap)) latents per tile; unless the two agree exactly, the blended
    result is too wide (e.g. tile 32, overlap 0.2 on a 96-wide clip gives 14 latents instead of 12).

    style "stride" (Wan, HunyuanVideo, LTX-Video): diffusers steps by a stride in pixels, keeps stride // spatial
    latents per tile and crops the result, so it is exact when the stride int(tile * (1 - overlap)) is a
    multiple of the spatial compression (otherwise the latents come out too small).

    style "widened" (MiniMax-H3): diffusers takes a tile size and a minimum overlap int(tile * overlap) in pixels,
    which it widens in whole latents until the tiles cover the frame; exact when that minimum is a multiple of the
    spatial compression.
    """
    for name, tile in (("height", tiling.tile_height), ("width", tiling.tile_width)):
        if tile % spatial or tile < 2 * spatial:
            return f"tile {name} {tile} must be a multiple of {spatial} and at least {2 * spatial}"
        if not 0.0 <= tiling.overlap < 1.0:
            return f"tile overlap {tiling.overlap} must be in [0, 1)"
        exact = {"overlap": _tile_exact, "stride": _stride_exact, "widened": _widened_exact}[style]
        if not exact(tile, tiling.overlap, spatial):
            stride_pixels = int(tile * (1 - tiling.overlap))
            good = [o for o in (0.125, 0.25, 1 / 3, 0.5) if exact(tile, o, spatial)]
            if style == "overlap":
                latent_tile = tile // spatial
                kept = latent_tile - int(latent_tile * tiling.overlap)
                why = f"keeps {kept} latents ({kept * spatial} pixels) per tile"
            elif style == "widened":
                return (f"tile {name} {tile} with overlap {tiling.overlap:g} overlaps {int(tile * tiling.overlap)} "
                        f"pixels, not a multiple of the spatial compression {spatial}, so the tiles leave the latent "
                        f"grid; exact overlaps for this tile: {', '.join(f'{o:g}' for o in good) or 'none'}")
            else:
                why = f"that is not a multiple of the spatial compression {spatial}"
            return (
                f"tile {name} {tile} with overlap {tiling.overlap:g} steps {stride_pixels} pixels but {why}, so the "
                f"latents come out the wrong size; exact overlaps for this tile: "
                f"{', '.join(f'{o:g}' for o in good) or 'none'}"
            )
    return None


def _stride_exact(tile: int, overlap: float, spatial: int) -> bool:
    stride = int(tile * (1 - overlap))
    return stride >= spatial and stride % spatial == 0


def _tile_exact(tile: int, overlap: float, spatial: int) -> bool:
    latent_tile = tile // spatial
    return int(tile * (1 - overlap)) == (latent_tile - int(latent_tile * overlap)) * spatial


def _widened_exact(tile: int, overlap: float, spatial: int) -> bool:
    # MiniMax-H3 widens overlaps in whole latents from this minimum: exact when the minimum is on the latent grid.
    return int(tile * overlap) % spatial == 0
