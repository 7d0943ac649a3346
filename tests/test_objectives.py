"""The objective interface: ADM gives the current train step's loss; flow trains a DiT; both
are built from config and from checkpoint meta."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import demo
from dit_jax import flow, models, objectives, step


def _tiny():
  model = models.DiT(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=1,
                     num_heads=2, num_classes=5)
  tx = optax.adam(1e-3)
  state = step.init_state(jax.random.PRNGKey(0), model, tx, (8, 8, 4))
  state = nn.meta.unbox(state)
  # A non-zero output layer, else the zero-initialised DiT predicts 0 whatever the inputs.
  params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                        state.params)
  state = state.replace(params=params, ema_params=params, opt_state=tx.init(params),
                        step=jnp.array(3, jnp.int32))
  rng = np.random.default_rng(0)
  batch = {"label": jnp.asarray(rng.integers(0, 5, 8), jnp.int32),
           "mean": jnp.asarray(rng.normal(size=(8, 2, 8, 8, 4)), jnp.float32),
           "std": jnp.asarray(rng.uniform(0.1, 0.5, size=(8, 2, 8, 8, 4)), jnp.float32)}
  return model, tx, state, batch


def test_adm_objective_gives_the_train_steps_loss_for_the_same_keys():
  model, tx, state, batch = _tiny()
  obj = objectives.from_config(demo.get_config())
  _, metrics = jax.jit(lambda s, b: step.train_step(
      s, b, model=model, objective=obj, tx=tx, schedule=optax.constant_schedule(1e-3),
      ema_decay=0.99, scale=0.5, random_flip=True))(state, batch)

  assert isinstance(obj, objectives.ADM) and obj.to_meta() == {
      "name": "adm", "steps": 1000, "noise_schedule": "linear"}

  @jax.jit
  def via_objective(state, batch):
    key = jax.random.fold_in(state.rng, state.step)
    k_x0, k_t, k_noise, k_drop = jax.random.split(key, 4)
    x0, _ = step.sample_latents(batch, k_x0, 0.5, True)
    # The step draws the label dropout for the whole batch from k_drop.
    drop = (jax.random.uniform(k_drop, (8,)) < model.class_dropout_prob).astype(jnp.int32)
    model_fn = lambda x, t: model.apply({"params": state.params}, x, t, batch["label"],
                                        train=True, force_drop_ids=drop)
    loss, logged = obj.training_losses(model_fn, x0, obj.draw(k_t, k_noise, x0))
    return loss.mean(), logged

  loss, logged = via_objective(state, batch)
  np.testing.assert_allclose(loss, metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(logged["mse"], metrics["mse"], rtol=1e-6)
  np.testing.assert_allclose(logged["vb"], metrics["vb"], rtol=1e-6)
  assert float(metrics["vb"]) > 0  # the variance channels are trained, as in the step


def test_flow_objective_trains_a_dit():
  model, _, state, batch = _tiny()
  c = demo.get_config()
  c.objective = objectives.default_config()
  c.objective.name = "flow"
  c.objective.time_sampling = "logit_normal"
  obj = objectives.from_config(c)
  assert isinstance(obj, objectives.Flow) and obj.transport.time_sampling == "logit_normal"
  x0 = batch["mean"][:, 0]

  def loss_fn(params, key):
    model_fn = lambda x, t: model.apply({"params": params}, x, t, batch["label"])
    loss, logged = obj.training_losses(model_fn, x0, obj.draw(*jax.random.split(key), x0))
    return loss.mean(), (loss, logged)

  (loss, (per_example, logged)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      state.params, jax.random.PRNGKey(1))
  assert per_example.shape == (8,) and np.isfinite(float(loss))
  assert set(logged) == {"loss_t0", "loss_t1", "loss_t2", "loss_t3"}
  assert float(optax.tree.norm(grads)) > 0
  # The model's sigma channels get no gradient (SiT drops them), the velocity ones do.
  final = grads["final_layer"]["linear"]["kernel"].reshape(32, 16, 8)
  assert float(jnp.abs(final[..., 4:]).max()) == 0 and float(jnp.abs(final[..., :4]).max()) > 0
  # t in [0, 1] reaches the model as floats.
  seen = []
  obj.training_losses(lambda x, t: seen.append(t) or jnp.concatenate([x, x], axis=-1), x0,
                      obj.draw(*jax.random.split(jax.random.PRNGKey(2)), x0))
  assert seen[0].dtype == jnp.float32 and 0 <= float(seen[0].min()) <= float(seen[0].max()) <= 1


def test_objectives_from_config_and_meta_round_trip():
  c = demo.get_config()
  assert objectives.from_config(c) == objectives.ADM(1000, "linear", True)
  c.diffusion.noise_schedule = "cosine"
  adm = objectives.from_config(c)
  assert objectives.from_meta({"objective": adm.to_meta(),
                               "model_kwargs": {"learn_sigma": True}}) == adm
  # Checkpoints written before objectives hold only meta["diffusion"].
  legacy = {"diffusion": {"steps": 500, "noise_schedule": "cosine"},
            "model_kwargs": {"learn_sigma": False}}
  assert objectives.from_meta(legacy) == objectives.ADM(500, "cosine", False)
  c.objective = objectives.default_config()
  c.objective.update(name="flow", path_type="VP", prediction="noise",
                     loss_weight="likelihood", sample_eps=0.01)
  fl = objectives.from_config(c)
  assert (fl.transport.train_eps, fl.transport.sample_eps) == (1e-5, 0.01)
  assert fl.transport.loss_weight == "likelihood"
  meta = {"objective": fl.to_meta(), "model_kwargs": {"learn_sigma": True}}
  assert objectives.from_meta(meta) == fl
  assert "sde-euler" in fl.samplers and "ddpm" in adm.samplers


@pytest.mark.parametrize("field,value,match", [
    ("name", "ddpm", "config.objective.name"),
    ("path_type", "Cosine", "config.objective.path_type"),
    ("prediction", "x0", "config.objective.prediction"),
    ("loss_weight", "snr", "config.objective.loss_weight")])
def test_bad_objective_config_names_the_field(field, value, match):
  c = demo.get_config()
  c.objective = objectives.default_config()
  c.objective.name = "flow"
  c.objective[field] = value
  with pytest.raises(ValueError, match=match):
    objectives.from_config(c)


def test_unknown_objective_fields_and_samplers_are_errors():
  c = demo.get_config()
  c.objective = ml_collections.ConfigDict({"name": "flow", "path": "Linear"})
  with pytest.raises(ValueError, match="unknown fields"):
    objectives.from_config(c)
  fl = objectives.Flow(flow.create_transport())
  with pytest.raises(ValueError, match="sampler"):
    fl.sample(lambda x, t: x, jnp.zeros((1, 2, 2, 1)), jax.random.PRNGKey(0), sampler="ddpm")


def test_objective_sample_entries():
  """Both objectives sample Gaussian data from their exact models through `sample`."""
  n, mu, s = 2048, 0.5, 0.3
  noise = jax.random.normal(jax.random.PRNGKey(0), (n, 2, 2, 1))
  fl = objectives.Flow(flow.create_transport("Linear", "velocity"), learn_sigma=False)

  def velocity(x, t):
    t = t.reshape(-1, 1, 1, 1)
    var = t ** 2 * s ** 2 + (1 - t) ** 2
    return mu + (t * s ** 2 - (1 - t)) * (x - t * mu) / var

  x = fl.sample(velocity, noise, jax.random.PRNGKey(1), sampler="dopri5")
  assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - s) < 0.02
  adm = objectives.ADM(learn_sigma=False)
  abar = jnp.asarray(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), jnp.float32)

  def eps(x, t):
    a = abar[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s ** 2 + 1 - a)

  x = adm.sample(eps, noise, jax.random.PRNGKey(1), sampler="ddim", steps=50)
  # DDIM-50 shrinks this spread by ~7% (discretization; see test_diffusion_samplers).
  assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - s) < 0.035
