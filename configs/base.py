"""Base config: the released DiT training recipe (Peebles & Xie, 2023).

Experiment files import `get_config()` from here and override a few fields. Launch:

  python -m dit_jax.main --config=configs/xl2.py --workdir=DIR --config.data.dir=LATENTS
"""

import ml_collections

from dit_jax import objectives, repa


def _add_sampler_options(section: ml_collections.ConfigDict) -> None:
  for key, value in objectives.sampler_option_defaults().items():
    if key not in section:
      section[key] = value


def get_config(model: str = "DiT-XL/2", image_size: int = 256) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Base seed: parameters, class dropout, timesteps, noise, flips and data order are all
  # derived from it (per step via fold_in), so a step depends only on (seed, step, state).
  c.seed = 0
  # Training length in optimizer steps (the paper's grid: 400K; DiT-XL/2 headline: 7M).
  c.total_steps = 400_000
  # JAX's persistent compilation cache, so a restart after preemption does not compile again;
  # empty: WORKDIR/compilation_cache (or $JAX_COMPILATION_CACHE_DIR when that is set).
  c.compilation_cache_dir = ""

  c.model = ml_collections.ConfigDict()
  # A name of dit_jax.models.DiT_models: 'DiT-S/8' ... 'DiT-XL/2', 'LightningDiT-B/1' ... '-1p6B/2'.
  c.model.name = model
  # Optional overrides of the named architecture, e.g. for small test models; None keeps the
  # paper's value (all None for the paper's grid).
  c.model.overrides = ml_collections.ConfigDict({
      "hidden_size": ml_collections.config_dict.placeholder(int),
      "depth": ml_collections.config_dict.placeholder(int),
      "num_heads": ml_collections.config_dict.placeholder(int),
      "patch_size": ml_collections.config_dict.placeholder(int),
      "mlp_ratio": ml_collections.config_dict.placeholder(float),
  })
  # Probability of replacing a label by the null class in training (enables guidance).
  c.model.class_dropout_prob = 0.1
  # Predict the variance interpolation as well as eps (hybrid loss, 2C output channels).
  c.model.learn_sigma = True
  # Compute dtype of the token matmuls (patch embed, qkv, proj, fc1, fc2) and attention:
  # 'bfloat16' on TPU/GPU. The conditioning (timestep/label embeddings, adaLN, modulate), the
  # LayerNorms, the residual stream and the final layer stay float32, as do parameters and
  # optimizer state.
  c.model.dtype = "float32"
  # Attention kernel (dit_jax/attention.py). 'auto' (default): cuDNN fused attention on GPUs
  # in bf16/fp16, splash on TPUs from 1,024 tokens, else the XLA path; 'xla' (or None): the
  # XLA path (einsums, float32 softmax) in the head-major layout; 'xla_tokens': the XLA path in
  # the token-major layout [N, T, heads, head_dim] through jax.nn.dot_product_attention (the
  # layout the splash and cuDNN kernels take; docs/performance.md compares it with head-major
  # for every grid config); 'cudnn': cuDNN only (GPUs, bf16/fp16); 'splash': the Pallas
  # splash-attention kernel (TPUs only; docs/performance.md compares it on v5p).
  c.model.attention_impl = ml_collections.config_dict.placeholder(str)
  c.model.attention_impl = "auto"
  # Rematerialisation of each block in the backward pass (dit_jax.models.REMAT_POLICIES):
  # 'none'; 'full' (keep only each block's input: least memory, recomputes the forward);
  # 'dots_with_no_batch_dims_saveable' (keep the token matmuls' outputs, recompute attention
  # and the elementwise work); 'dots_saveable' (also keep attention's [N, heads, T, T] logits);
  # 'auto': the first of none, dots_with_no_batch_dims_saveable, full whose compiled step fits
  # 90% of a device's memory (step.build; needs a known device memory, else none).
  c.model.remat = "none"
  # The block's parts (dit_jax.models.NORMS, MLPS, POS_EMBEDDINGS, ATTENTIONS) and
  # LightningDiT's options; unset (None): the named model's (the release's for DiT-*,
  # LightningDiT's for LightningDiT-*: rmsnorm, swiglu, rope on, qk_norm off, shift on).
  # The norm of every block and of the final layer: 'layernorm' (no affine, eps 1e-6, float32)
  # or 'rmsnorm' (learned weight, eps 1e-6, float32).
  c.model.norm = ml_collections.config_dict.placeholder(str)
  # The block MLP: 'gelu' (Linear(D, mlp_ratio D), tanh GELU, Linear back) or 'swiglu' (a fused
  # w12 to 2 int(2/3 mlp_ratio D), silu(x1) x2, w3 back).
  c.model.mlp = ml_collections.config_dict.placeholder(str)
  # The fixed position table added to the patch tokens: 'sincos' (MAE's 2-D sin-cos).
  c.model.pos_embedding = ml_collections.config_dict.placeholder(str)
  # The block's attention: 'mha' (fused qkv, multi-head self-attention; its kernel is
  # attention_impl below).
  c.model.attention = ml_collections.config_dict.placeholder(str)
  # 2-D rotary position embedding on q and k (EVA-02 / LightningDiT), in every attention path.
  c.model.rope = ml_collections.config_dict.placeholder(bool)
  # q_norm/k_norm over head_dim (the block's norm kind): against NaN in long runs, at some FID.
  c.model.qk_norm = ml_collections.config_dict.placeholder(bool)
  # adaLN shifts: False gives 4 modulations per block (scale and gate per branch) instead of 6.
  c.model.adaln_shift = ml_collections.config_dict.placeholder(bool)
  # nn.scan over the blocks: one compiled block instead of depth copies (faster compiles);
  # parameters are stacked [depth, ...] under 'blocks' instead of blocks_0 ... blocks_{depth-1}.
  # Checkpoints of either layout resume in the other; the released-checkpoint converter
  # handles both (dit_jax/convert.py).
  c.model.scan_layers = False

  c.data = ml_collections.ConfigDict()
  # Directory of latent records and manifest.json written by dit_jax.prepare_latents.
  c.data.dir = ""
  # Instead of dir: a dataset built into dit_jax ('digits'), written into WORKDIR/data on first use.
  c.data.builtin = ""
  # The built-in dataset with each image stored beside its latent (the 'image' extra REPA's
  # encoder reads), in its own WORKDIR/data folder.
  c.data.with_images = False
  # Image resolution the latents were made from; checked against the manifest (8x VAE).
  c.data.image_size = image_size
  # Global batch over all devices and processes (the release: 256).
  c.data.global_batch_size = 256
  # Records held in each process's shuffle buffer.
  c.data.shuffle_buffer = 10_000
  # Shards read in parallel by each process.
  c.data.cycle_length = 8
  # Use the horizontally flipped latent with probability 1/2 (the release's random flip).
  c.data.random_flip = True
  # Hash every shard against the manifest at start-up (slow on large datasets; sizes are always checked).
  c.data.verify_checksums = False

  c.diffusion = ml_collections.ConfigDict()
  # Training process: 1000 steps, linear betas 1e-4..0.02 (scaled by 1000/T).
  c.diffusion.steps = 1000
  c.diffusion.noise_schedule = "linear"

  # The training objective (dit_jax/objectives/, docs/objectives.md), recorded in every
  # checkpoint: grids, evaluation and dit_jax.sample sample with its samplers. config.objective
  # .name picks one of objectives.names() ('adm': DiT's diffusion, its process in
  # config.diffusion; 'flow': SiT's flow matching; ...); the other fields are each objective's
  # own, commented where it declares them (dit_jax/objectives/<name>.py, `config_fields`).
  c.objective = objectives.default_config()

  # REPA (dit_jax/repa.py, docs/repa.md): align the hidden states after block repa.depth with
  # a frozen encoder's patch features of the image stored beside each latent; off while
  # repa.encoder is ''.
  c.repa = repa.config_fields()

  c.optim = ml_collections.ConfigDict()
  # AdamW as released: constant lr 1e-4, no weight decay, no warmup, no clipping.
  c.optim.learning_rate = 1e-4
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  # Linear warmup steps (0 = none, as released).
  c.optim.warmup_steps = 0
  # After the warmup: 'constant' (as released), or 'cosine' / 'linear' decay from learning_rate
  # to min_learning_rate at step decay_steps (0 = total_steps), and min_learning_rate after.
  c.optim.schedule = "constant"
  c.optim.decay_steps = 0
  c.optim.min_learning_rate = 0.0
  # Global-norm gradient clipping threshold (0 = off, as released).
  c.optim.grad_clip_norm = 0.0
  # Gradient accumulation: the global batch is processed in this many microbatches, scanned
  # inside the one compiled step (the same update as the whole batch, up to float rounding;
  # activations for 1/N of the batch). 0 = auto: 1, unless no layout and remat policy fits a
  # device's memory, then the fewest of 2, 4, ... that fits (e.g. XL/2 at 512 px on one GPU).
  c.optim.microbatches = 0
  # EMA decay of the parameters, updated every step; samples use the EMA.
  c.ema_decay = 0.9999

  c.mesh = ml_collections.ConfigDict()
  # Device mesh (data, fsdp) of ONE slice; -1 = the remaining devices. Parameters, EMA and
  # optimizer state are sharded over 'fsdp' by the rules in dit_jax/sharding.py; the batch
  # over both. Several slices (multi-slice TPU jobs) multiply 'data' over the DCN.
  c.mesh.data = -1
  # 0 = auto: data parallel where the compiled step fits 90% of a device's memory (XL/2 at
  # batch 256 on v5p-8 and up), else the smallest power-of-two FSDP within a slice that fits
  # (e.g. XL on small slices of 16 GiB v5e chips); or a size (-1 = all devices of a slice).
  c.mesh.fsdp = 0
  # On TPUs, compile the step with XLA's options that overlap the data-parallel collectives
  # (gradient reduce-scatter, parameter all-gather) with compute (dit_jax.sharding
  # .TPU_OVERLAP_OPTIONS); the planner (dit_jax.aot) compiles with the same setting. Off: in
  # the planner they make XL/2's step slower by XLA's estimate, with more all-gather bytes and
  # a longer compile (docs/performance.md, "The overlap options", has the figures). Try them
  # on a real pod, where overlap that XLA's static estimate does not credit may pay.
  c.mesh.overlap_collectives = False

  # How each part of the train state is laid out over the mesh (dit_jax/sharding.py).
  c.sharding = ml_collections.ConfigDict()
  # Logical parameter axis -> mesh axis, for the parameters as the forward and backward use
  # them: the hidden width over 'fsdp' (a no-op at fsdp = 1, plain data parallelism).
  c.sharding.rules = (("embed", "fsdp"),)
  # The stored float32 parameters, the Adam moments and the EMA: 'update' shards each over
  # the data-parallel devices of a slice (weight-update sharding, Xu et al. 2020): each device
  # updates 1/N of the 10 GiB XL state, gradients arrive by reduce-scatter and the parameters
  # go back to the forward by all-gather in its dtype (bf16 token-matmul kernels). 'compute'
  # keeps the part as the forward uses it (replicated at fsdp = 1, as the release). 'update'
  # cuts the memory per chip and the step time on every slice: docs/performance.md has XL/2's
  # figures per slice from dit_jax.aot (the XL/2 layout table, replicated -> default). Sampling,
  # evaluation and export gather the EMA whole where they need it.
  c.sharding.params = "update"
  c.sharding.opt_state = "update"
  c.sharding.ema = "update"
  # How a data-parallel step (fsdp 1) moves parameters and gradients: 'explicit' runs the
  # forward and backward per device in a shard_map with the all-gather (in the forward's
  # dtype) and the gradient reduce-scatter written out; 'xla' leaves them to XLA's
  # partitioner, which on large TPU slices reduces gradients with all-reduces. FSDP layouts
  # always use 'xla'. 'explicit' turns the partitioner's whole-array all-reduces into
  # all-gathers and reduce-scatters and is faster by XLA's estimate, most on large slices
  # (docs/performance.md: "What the explicit step changes" and the XL/2 layout table, update
  # XLA -> adaLN gathered); the same numbers up to the order of float sums (docs/pods.md).
  c.sharding.collectives = "explicit"
  # Where the explicit step computes the adaLN modulations: 'stationary' where their
  # parameters are stored (each device multiplies its group's conditioning vectors by its own
  # columns of each adaLN kernel, and an all-to-all returns the rows), 'gathered' after
  # gathering the kernels whole like every other parameter. The adaLN kernels are a third of
  # XL's parameters and float32 in the forward, but act on one vector per image: stationary,
  # they are neither gathered nor their gradients reduce-scattered, which makes the step faster
  # by XLA's estimate on every slice; the same numbers up to the order of float sums
  # (docs/pods.md has XL/2's figures, gathered -> stationary). Only with the explicit
  # collectives.
  c.sharding.modulation = "stationary"

  c.checkpoint = ml_collections.ConfigDict()
  # Save every N steps (and at the end, and on SIGTERM).
  c.checkpoint.every_steps = 5_000
  # Checkpoints kept in WORKDIR/checkpoints.
  c.checkpoint.keep = 3
  # Also keep every checkpoint whose step is a multiple of this, for good (0 = none); the
  # scaling grid's FID-vs-steps needs 50_000 (checkpoints at 50K, 100K ... 400K).
  c.checkpoint.keep_period = 0
  # Reading a checkpoint is tried this many times, waiting restore_backoff_s, then 4x longer
  # after each failure (2, 8, 32 s), before it is set aside as unreadable and the previous
  # checkpoint is used: a transient storage error on one host must not lose the newest one.
  # Damage (data loss, a missing or truncated file, wrong digests or meta) is set aside at once.
  # All numeric fields are range-checked at start-up (dit_jax/config_checks.py).
  c.checkpoint.restore_attempts = 4
  c.checkpoint.restore_backoff_s = 2.0
  # Write checkpoints in the background while training continues.
  c.checkpoint.async_save = True

  # Scalars (loss, mse, vb, grad norm, lr, steps/s, MFU) every N steps.
  c.log_every_steps = 100
  # Steps the host may dispatch ahead of the device (0 = unbounded). With 2 the device always
  # has the next step queued, and a SIGTERM's checkpoint lands at most 2 steps after the step
  # the device was running (unbounded, the host ran 25-34 steps ahead on the CPU demo).
  c.steps_in_flight = 2

  c.profile = ml_collections.ConfigDict()
  # jax.profiler trace of num_steps steps after start_step steps (0 = off), written to
  # WORKDIR/profile for TensorBoard's profile tab; start after compilation and warm-up.
  c.profile.start_step = 10
  c.profile.num_steps = 0

  c.sample = ml_collections.ConfigDict()
  # A class-conditional grid from the EMA weights every N steps (0 = off) and at the end.
  c.sample.every_steps = 20_000
  # Images in the periodic grid (0 = no grids).
  c.sample.num_images = 16
  # Sampler: one of the trained objective's (docs/objectives.md); '' is its default (ADM:
  # 'ddpm', the release's; flow: 'sde-euler'; EDM: 'heun').
  c.sample.sampler = ""
  # Steps of the sampler (ADM: model calls per image, x2 images each with guidance; flow: SiT's
  # grid points; EDM: Heun steps, 2 steps - 1 calls); 0 is the sampler's default (ADM: the
  # release's 250 DDPM steps, 20 DPM-Solver++; flow 250; EDM 18). docs/sampler_quality.md.
  c.sample.steps = 0
  # Guide only inside an interval of noise levels (Kynkaanniemi et al. 2024), in the objective's
  # units: ADM and EDM sigma (lo, hi], ADM's sigma_t = sqrt((1 - abar_t) / abar_t); flow time
  # (t_lo, t_hi), t = 0 noise. Scale 1 elsewhere, at half the cost. (0, inf): every step.
  c.sample.guidance_interval = (0.0, float("inf"))
  # Guidance scale of the grid (1.5 reproduces the paper's FID; 4.0 looks best).
  c.sample.cfg_scale = 4.0
  # Guide only the first 3 latent channels as the release does (False: all channels; None:
  # the release's rule for ADM, every channel for flow and the other objectives).
  c.sample.release_cfg = ml_collections.config_dict.placeholder(bool)
  # Matmul precision of sampling and decoding (grids and evaluation): 'highest' computes
  # float32 as the release does, also on TPUs (whose default is one bfloat16 pass).
  c.sample.matmul_precision = "highest"

  # Every objective's own sampler options, at their unset values; each objective takes its own
  # and refuses another's set (ADM: spacing 'time'/'logsnr'/'karras', the release's respacing
  # string '250' or 'ddim50' that replaces sampler and steps, DDIM's eta; flow: the ODE's
  # atol/rtol, the SDE's diffusion_form, diffusion_norm, last_step, last_step_size; EDM: the
  # sigma grid and the churn S_churn, S_min, S_max, S_noise). Each is documented where its
  # objective declares it (`sampler_options` in dit_jax/objectives/<name>.py).
  # config.eval holds the same.
  _add_sampler_options(c.sample)

  c.eval = ml_collections.ConfigDict()
  # FID/sFID/IS/precision/recall of EMA samples every N steps and at the end (0 = off); the
  # paper's numbers need FID-50K with dit_jax.sample + dit_jax.evaluate, this tracks progress.
  c.eval.every_steps = 0
  # Samples per evaluation (FID-5K is noisy but cheap; 50000 matches the paper).
  c.eval.num_samples = 5_000
  # Global sampling batch for evaluation.
  c.eval.batch_size = 256
  # Guidance scale (1.5: the paper's headline; 1.0: the grid's unguided FIDs).
  c.eval.cfg_scale = 1.5
  # Sampler, steps, guidance interval and the objectives' sampler options as in `sample`
  # ('' and 0: the objective's defaults, for ADM the paper's 250 DDPM steps).
  c.eval.sampler = ""
  c.eval.steps = 0
  c.eval.guidance_interval = (0.0, float("inf"))
  _add_sampler_options(c.eval)
  # FID Inception weights: pt_inception-2015-12-05-6726825d.pth or its converted .npz.
  c.eval.inception = ""
  # Reference: ADM batch .npz (VIRTUAL_imagenet256_labeled.npz), an image folder or tfds:NAME.
  c.eval.reference = ""
  # Images per device in each Inception call.
  c.eval.inception_batch_per_device = 32

  c.vae = ml_collections.ConfigDict()
  # Decoder of sample grids and evaluation: a diffusers AutoencoderKL folder (sd-vae-ft-ema), a
  # named VAE 'NAME:WEIGHTS' (vavae_f16d32:PATH.pt) or 'identity'; empty: the VAE recorded in
  # the latents' manifest (identity for pixel data).
  c.vae.path = ""
  # Latent scale factor; None takes the manifest's value (0.18215 for the SD VAE; 1 with
  # per-channel statistics, which the manifest holds and training applies before it).
  c.vae.scale_factor = ml_collections.config_dict.placeholder(float)
  # The latents' shape when planning without data (dit_jax.aot, benchmarks): image_size /
  # downsample_factor square, latent_channels deep (SD-VAE: 8 and 4; VA-VAE f16d32: 16, 32).
  # Training reads the shape from the manifest.
  c.vae.downsample_factor = 8
  c.vae.latent_channels = 4
  return c
