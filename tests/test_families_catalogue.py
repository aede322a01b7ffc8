"""Issue 8: every scheduler config a diffusers user can have is read into its model family, or refused by name.

Two populations: the Hub configs in tests/fixtures/hub (see SOURCES.md there) and the default config of every
scheduler class diffusers exports, as ``save_pretrained`` would write it. Each is checked against an explicit
expected table (a class diffusers adds later fails ``test_table_covers_every_export`` until it gets an entry), and
each accepted family's time axis is checked against the source scheduler's own numbers.

The second half runs the checks of diffusers' ``SchedulerCommonTest`` (written here, not copied) on both VE
schedulers for a config of every family.
"""

import functools
import inspect
import json
import math
from pathlib import Path

import diffusers
import diffusers.schedulers
import numpy as np
import pytest
import torch
from diffusers import SchedulerMixin

from diffusers_ve import VEHeunScheduler, VEScheduler, process

# diffusers' KDPM2/LMS schedulers raise numpy-2 DeprecationWarnings per table entry (16000 per run): not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
HUB = Path(__file__).parent / "fixtures" / "hub"
REFUSED = "refused"
FAMILIES = ("vp", "ve", "edm", "flow")

# family each default config must be read into (REFUSED: a ValueError naming the class)
EXPECTED_CLASSES = {
    "AmusedScheduler": REFUSED,  # VQ
    "BlockRefinementScheduler": REFUSED,  # discrete tokens
    "CMStochasticIterativeScheduler": REFUSED,  # consistency model
    "CogVideoXDDIMScheduler": "vp",  # snr_shift_scale honoured
    "CogVideoXDPMScheduler": "vp",
    "ConsistencyDecoderScheduler": REFUSED,
    "CosineDPMSolverMultistepScheduler": REFUSED,  # c_noise = atan(sigma)/pi*2, not EDM's ln(sigma)/4
    "DDIMInverseScheduler": "vp",
    "DDIMParallelScheduler": "vp",
    "DDIMScheduler": "vp",
    "DDPMParallelScheduler": "vp",
    "DDPMScheduler": "vp",
    "DDPMWuerstchenScheduler": REFUSED,
    "DEISMultistepScheduler": "vp",
    "DPMSolverMultistepInverseScheduler": "vp",
    "DPMSolverMultistepScheduler": "vp",
    "DPMSolverSDEScheduler": "vp",
    "DPMSolverSinglestepScheduler": "vp",
    "DiscreteDDIMScheduler": REFUSED,  # discrete (masked) diffusion
    "EDMDPMSolverMultistepScheduler": "edm",
    "EDMEulerScheduler": "edm",
    "EntropyBoundScheduler": REFUSED,
    "EulerAncestralDiscreteScheduler": "vp",
    "EulerDiscreteScheduler": "vp",
    "FlowMapEulerDiscreteScheduler": REFUSED,  # flow-map distillation: the model jumps, it does not denoise
    "FlowMatchEulerDiscreteScheduler": "flow",
    "FlowMatchHeunDiscreteScheduler": "flow",
    "FlowMatchLCMScheduler": REFUSED,
    "HeliosDMDScheduler": REFUSED,  # DMD-distilled
    "HeliosScheduler": REFUSED,  # multi-stage pyramid: not one time axis
    "HeunDiscreteScheduler": "vp",
    "IPNDMScheduler": REFUSED,
    "KDPM2AncestralDiscreteScheduler": "vp",
    "KDPM2DiscreteScheduler": "vp",
    "KarrasVeScheduler": REFUSED,
    "LCMScheduler": REFUSED,
    "LMSDiscreteScheduler": "vp",
    "LTXEulerAncestralRFScheduler": REFUSED,  # unknown class
    "MiniMaxH3Scheduler": REFUSED,
    "PNDMScheduler": "vp",
    "PiflowScheduler": REFUSED,  # policy-distilled
    "RFD4ProteinaScheduler": REFUSED,  # proteins
    "RePaintScheduler": "vp",
    "SASolverScheduler": "vp",
    "SCMScheduler": REFUSED,  # sCM consistency (trigflow)
    "ScoreSdeVeScheduler": "ve",
    "ScoreSdeVpScheduler": REFUSED,
    "TCDScheduler": REFUSED,
    "UnCLIPScheduler": "vp",
    "UniPCMultistepScheduler": "vp",
    "VQDiffusionScheduler": REFUSED,
}
# arguments for the classes that have no default constructor
CTOR_ARGS = {
    "AmusedScheduler": dict(mask_token_id=8191),
    "VQDiffusionScheduler": dict(num_vec_classes=4097),
    "RFD4ProteinaScheduler": dict(schedule_mode="log", noise_mode="1/t", tsr_k=1.0, tsr_sigma=1.0),
}
# (family, prediction_type) of each Hub fixture; REFUSED fixtures give the class their message must name
EXPECTED_FIXTURES = {
    "runwayml--stable-diffusion-v1-5": ("vp", "epsilon"),
    "stabilityai--stable-diffusion-2-1": ("vp", "v_prediction"),
    "stabilityai--stable-diffusion-xl-base-1.0": ("vp", "epsilon"),
    "stabilityai--sdxl-turbo": ("vp", "epsilon"),
    "DeepFloyd--IF-I-XL-v1.0": ("vp", "epsilon"),
    "kandinsky-community--kandinsky-2-2-decoder": ("vp", "epsilon"),
    "PixArt-alpha--PixArt-XL-2-1024-MS": ("vp", "epsilon"),
    "playgroundai--playground-v2.5-1024px-aesthetic": ("edm", "epsilon"),
    "google--ddpm-cifar10-32": ("vp", "epsilon"),
    "google--ncsnpp-celebahq-256": ("ve", "score"),
    "stabilityai--stable-diffusion-3-medium-diffusers": ("flow", "flow_prediction"),
    "stabilityai--stable-diffusion-3.5-large": ("flow", "flow_prediction"),
    "stabilityai--stable-diffusion-2-1-base": ("vp", "epsilon"),
    "black-forest-labs--FLUX.1-dev": ("flow", "flow_prediction"),
    "latent-consistency--lcm-lora-sdxl": (REFUSED, "LCMScheduler"),
    "stabilityai--stable-cascade": (REFUSED, "DDPMWuerstchenScheduler"),
    "THUDM--CogVideoX-2b": ("vp", "v_prediction"),
    "Wan-AI--Wan2.1-T2V-1.3B-Diffusers": ("flow", "flow_prediction"),
    "Efficient-Large-Model--Sana_1600M_1024px_diffusers": ("flow", "flow_prediction"),
    "stabilityai--stable-video-diffusion-img2vid-xt": ("vp", "v_prediction"),
}
DEFAULT_PREDICTION = {"vp": "epsilon", "edm": "epsilon", "ve": "score", "flow": "flow_prediction"}


# ------------------------------------------------------------------------------------------------ population
def _exports():
    """Every scheduler class diffusers exports (torchsde-only ones appear as dummy objects)."""
    found = {}
    for module in (diffusers, diffusers.schedulers):
        for name in (n for n in dir(module) if n.endswith("Scheduler")):  # getattr imports lazily: filter first
            obj = getattr(module, name, None)
            if not inspect.isclass(obj) or obj is SchedulerMixin:
                continue
            if issubclass(obj, SchedulerMixin) or type(obj).__name__ == "DummyObject":
                found[name] = obj
    return found


EXPORTS = _exports()


def _is_dummy(cls):
    return type(cls).__name__ == "DummyObject"


def _default_config(name):
    return json.loads(_default_json(name))


@functools.lru_cache(maxsize=None)
def _default_json(name):
    """The class's default config exactly as save_pretrained writes it (`_class_name`, no `_use_default_values`)."""
    cls = EXPORTS[name]
    if _is_dummy(cls):
        pytest.skip(f"{name} needs torchsde, which is not installed")
    text = cls(**CTOR_ARGS.get(name, {})).to_json_string()
    cfg = json.loads(text)
    assert cfg["_class_name"] == name and "_use_default_values" not in cfg
    return text


def _fixture(name):
    return json.loads((HUB / f"{name}.json").read_text())


CASES = [("class", n) for n in sorted(EXPECTED_CLASSES)] + [("hub", n) for n in sorted(EXPECTED_FIXTURES)]


def _case(kind, name):
    """(config, expected family or REFUSED, expected prediction type or refused class name)."""
    if kind == "class":
        family = EXPECTED_CLASSES[name]
        return _default_config(name), family, (name if family == REFUSED else DEFAULT_PREDICTION[family])
    family, second = EXPECTED_FIXTURES[name]
    return _fixture(name), family, second


def _source(cfg):
    """The scheduler the config belongs to, built from it as diffusers would (shared: KDPM2's takes 1 s)."""
    return _built(json.dumps(cfg, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _built(text):
    cfg = json.loads(text)
    return EXPORTS[cfg["_class_name"]].from_config(cfg)


def _expected_family(kind, name):
    return EXPECTED_CLASSES[name] if kind == "class" else EXPECTED_FIXTURES[name][0]


ACCEPTED = [c for c in CASES if _expected_family(*c) != REFUSED]


# ----------------------------------------------------------------------------------------------- the tables
def test_table_covers_every_export():
    assert set(EXPORTS) == set(EXPECTED_CLASSES), (
        f"new exports without an expected family: {sorted(set(EXPORTS) - set(EXPECTED_CLASSES))}; "
        f"entries no longer exported: {sorted(set(EXPECTED_CLASSES) - set(EXPORTS))}"
    )


def test_table_covers_every_fixture():
    on_disk = {p.stem for p in HUB.glob("*.json")}
    assert on_disk == set(EXPECTED_FIXTURES)
    for name in on_disk:
        cfg = _fixture(name)
        assert "_class_name" in cfg and "_diffusers_version" in cfg, name


# ------------------------------------------------------------------------------------- family read or refused
@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}:{n}" for k, n in CASES])
def test_family_is_read_or_refused_by_name(kind, name):
    cfg, family, second = _case(kind, name)
    if family == REFUSED:
        with pytest.raises(process.UnsupportedConfigError) as err:
            process.model_family(cfg)
        assert isinstance(err.value, ValueError)
        message = str(err.value)
        assert second in message, f"the refusal must name {second}: {message}"
        assert all(f in message for f in ("EDMEulerScheduler", "FlowMatchEulerDiscreteScheduler")) or all(
            f in message for f in FAMILIES
        ), f"the refusal must list the supported families or classes: {message}"
        for cls in (VEScheduler, VEHeunScheduler):
            with pytest.raises(ValueError, match=second):
                cls.from_config(cfg)
        return
    fam = process.model_family(cfg)
    assert fam.name == family
    assert fam.prediction_type == second
    built = [cls.from_config(cfg) for cls in (VEScheduler, VEHeunScheduler)]
    for sched in built:
        assert sched.config["model_family"] == family
        assert sched.config["prediction_type"] == second
    assert built[0].init_noise_sigma == pytest.approx(built[1].init_noise_sigma, rel=1e-12)
    torch.testing.assert_close(built[0].alphas_cumprod, built[1].alphas_cumprod)


@pytest.mark.parametrize("cfg", [
    {"_class_name": "MyOwnScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000},
    json.loads(diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True).to_json_string()),
], ids=["unknown-class", "flow-invert_sigmas"])
def test_unreadable_configs_are_refused(cfg):
    with pytest.raises(process.UnsupportedConfigError) as err:
        process.model_family(cfg)
    assert cfg["_class_name"] in str(err.value) or "invert_sigmas" in str(err.value)
    with pytest.raises(ValueError):
        VEScheduler.from_config(cfg)


@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_flow_switch_on_a_ddpm_class_is_flow(cls):
    sched = EXPORTS[cls](use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    on = json.loads(sched.to_json_string())
    assert process.model_family(on).name == "flow"
    off = dict(on, use_flow_sigmas=False, prediction_type="epsilon")
    assert process.model_family(off).name == "vp"


# ---------------------------------------------------------------------------------- time axis vs the source
@pytest.mark.parametrize("kind,name", ACCEPTED, ids=[f"{k}:{n}" for k, n in ACCEPTED])
def test_time_axis_matches_source(kind, name):
    cfg, family, _ = _case(kind, name)
    fam, src = process.model_family(cfg), _source(cfg)
    {"vp": _check_vp, "edm": _check_edm, "flow": _check_flow, "ve": _check_ve}[family](fam, src)
    t = torch.logspace(math.log10(fam.t_min), math.log10(fam.t_max), 7, dtype=torch.float64)
    torch.testing.assert_close(fam.t(fam.timestep(t)), t, rtol=1e-9, atol=0)
    assert fam.t_start == (math.inf if family == "flow" else pytest.approx(fam.t_max, rel=1e-12))


def _check_vp(fam, src):
    if src.config.get("timestep_type") == "continuous":  # SVD: the model takes 0.25 ln sigma over its own range
        return _check_vp_continuous(fam, src)
    ac = src.alphas_cumprod.double()
    torch.testing.assert_close(fam.alphas_cumprod, ac, rtol=2e-5, atol=1e-7)
    assert fam.alphas_cumprod.dtype == fam.betas.dtype == torch.float64
    k = len(ac)
    assert fam.num_train_timesteps == k
    tau = torch.arange(k, dtype=torch.float64)
    abar = fam.alphas_cumprod
    zero_snr = bool(src.config.get("rescale_betas_zero_snr"))  # abar_{K-1} = 0: t there is clamped or inf
    n = k - 1 if zero_snr else k
    torch.testing.assert_close(fam.t(tau[:n]), (1 - abar[:n]) / abar[:n], rtol=1e-9, atol=0)
    if zero_snr:
        assert fam.t(tau[-1:]).item() > 1e6
    t = fam.t(tau[:n:100])
    torch.testing.assert_close(fam.scale(t), (1 + t) ** -0.5, rtol=1e-12, atol=0)
    torch.testing.assert_close(fam.input_scale(t), torch.ones_like(t))


def _check_vp_continuous(fam, src):
    cfg = src.config
    assert fam.t_min == pytest.approx(cfg.sigma_min**2, rel=1e-9)
    assert fam.t_max == pytest.approx(cfg.sigma_max**2, rel=1e-9)
    src.set_timesteps(10)
    t = src.sigmas[:-1].double() ** 2
    torch.testing.assert_close(fam.t(src.timesteps.double()), t, rtol=2e-6, atol=0)


def _check_edm(fam, src):
    cfg = src.config
    assert fam.t_min == pytest.approx(cfg.sigma_min**2, rel=1e-12)
    assert fam.t_max == pytest.approx(cfg.sigma_max**2, rel=1e-12)
    src.set_timesteps(10)
    t = src.sigmas[:-1].double() ** 2
    torch.testing.assert_close(fam.t(src.timesteps.double()), t, rtol=2e-6, atol=0)
    torch.testing.assert_close(fam.timestep(t), 0.25 * t.log() / 2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fam.sigma(t), t.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(fam.scale(t), torch.ones_like(t))
    x = torch.ones(1)
    c_in = torch.tensor([float(src.scale_model_input(x, ts)) for ts in src.timesteps[:1]], dtype=torch.float64)
    torch.testing.assert_close(fam.input_scale(t[:1]), c_in, rtol=1e-6, atol=0)


def _check_flow(fam, src):
    kwargs = {"mu": 0.8} if src.config.get("use_dynamic_shifting") else {}
    src.set_timesteps(10, **kwargs)
    s, ts = src.sigmas[:-1].double(), src.timesteps.double()
    k = src.config.num_train_timesteps
    exact = src.timesteps.is_floating_point()  # DPMSolver/UniPC round flow timesteps to integers
    # t = (s / (1 - s))^2 compared in s units: near s = 1 a float32 s makes t itself ill-conditioned
    torch.testing.assert_close(fam.sigma(fam.t(ts)), s, rtol=0, atol=1e-6 if exact else 1.0 / k + 1e-6)
    finite = s < 1
    if exact:
        assert torch.isinf(fam.t(ts[~finite])).all()
    s_f = torch.tensor([0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    t = (s_f / (1 - s_f)) ** 2
    torch.testing.assert_close(fam.t(s_f * k), t, rtol=1e-10, atol=0)
    torch.testing.assert_close(fam.timestep(t), s_f * k, rtol=1e-10, atol=0)
    torch.testing.assert_close(fam.scale(t), 1 - s_f, rtol=1e-10, atol=0)
    assert fam.t_start == math.inf


def _check_ve(fam, src):
    cfg = src.config
    assert fam.t_min == pytest.approx(cfg.sigma_min**2, rel=1e-12)
    assert fam.t_max == pytest.approx(cfg.sigma_max**2, rel=1e-12)
    src.set_timesteps(10)
    src.set_sigmas(10)
    sigma = src.sigmas.double()  # ScoreSdeVePipeline calls unet(sample, sigma): the timestep is sigma
    torch.testing.assert_close(fam.t(sigma), sigma**2, rtol=1e-12, atol=0)
    t = sigma**2
    torch.testing.assert_close(fam.timestep(t), t.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(fam.scale(t), torch.ones_like(t))


@pytest.mark.parametrize("kind,name", ACCEPTED, ids=[f"{k}:{n}" for k, n in ACCEPTED])
def test_scheduler_presents_the_family_state(kind, name):
    """init_noise_sigma and timesteps in the model's own units, not a DDPM table's."""
    cfg, family, _ = _case(kind, name)
    src = _source(cfg)
    kwargs = {"mu": 0.8} if family == "flow" and cfg.get("use_dynamic_shifting") else {}
    for cls in (VEScheduler, VEHeunScheduler):
        sched = cls.from_config(cfg)
        sched.set_timesteps(5, **kwargs)
        ts = sched.timesteps.double()
        lo, hi = _timestep_range(family, src)
        assert ts.min() >= lo - 1e-4 * abs(lo) - 1e-6 and ts.max() <= hi + 1e-4 * abs(hi) + 1e-6, (ts, lo, hi)
        expected_init = {"vp": 1.0, "flow": 1.0, "ve": src.config.get("sigma_max"), "edm": None}[family]
        if family == "edm":
            src.set_timesteps(5)
            expected_init = src.init_noise_sigma
        assert float(sched.init_noise_sigma) == pytest.approx(expected_init, rel=1e-3)


def _timestep_range(family, src):
    cfg = src.config
    if family == "vp" and cfg.get("timestep_type") == "continuous":
        return math.log(cfg.sigma_min) / 4, math.log(cfg.sigma_max) / 4
    if family == "vp":
        return 0.0, cfg.num_train_timesteps - 1.0
    if family == "flow":
        return 0.0, float(cfg.num_train_timesteps)
    if family == "ve":
        return cfg.sigma_min, cfg.sigma_max
    return math.log(cfg.sigma_min) / 4, math.log(cfg.sigma_max) / 4


@pytest.mark.parametrize("name", ["stabilityai--stable-diffusion-3-medium-diffusers", "black-forest-labs--FLUX.1-dev"])
def test_flow_scale_noise_matches_flowmatch(name):
    cfg = _fixture(name)
    kwargs = {"mu": 0.8} if cfg.get("use_dynamic_shifting") else {}
    src, ours = _source(cfg), VEScheduler.from_config(cfg)
    src.set_timesteps(4, **kwargs)
    ours.set_timesteps(4, **kwargs)
    g = torch.Generator().manual_seed(0)
    y, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i in (1, 2):
        expected = src.scale_noise(y, src.timesteps[i:i + 1], eps)
        got = ours.scale_noise(y, ours.timesteps[i:i + 1], eps)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["Efficient-Large-Model--Sana_1600M_1024px_diffusers", "Wan-AI--Wan2.1-T2V-1.3B-Diffusers"])
def test_flow_shift_of_a_ddpm_class_moves_the_grid_as_shift_does(name):
    """DPMSolver/UniPC keep the shift in `flow_shift`, FlowMatch in `shift`: the same shift must give the same grid."""
    cfg = _fixture(name)
    twin = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": cfg["flow_shift"]}
    plain = dict(twin, shift=1.0)
    grids = []
    for c in (cfg, twin, plain):
        sched = VEScheduler.from_config(c)
        sched.set_timesteps(6)
        grids.append(sched.timesteps.double())
    torch.testing.assert_close(grids[0], grids[1])
    assert (grids[0][1:] > grids[2][1:] + 1).all(), "flow_shift was dropped"


# ----------------------------------------------------------------- SchedulerCommonTest's checks, per family
FAMILY_FIXTURES = {
    "vp": "runwayml--stable-diffusion-v1-5",
    "vp-v": "stabilityai--stable-diffusion-2-1",
    "ve": "google--ncsnpp-celebahq-256",
    "edm": "playgroundai--playground-v2.5-1024px-aesthetic",
    "flow": "stabilityai--stable-diffusion-3-medium-diffusers",
    "flow-dynamic": "black-forest-labs--FLUX.1-dev",
}
COMMON = [(f, c) for f in FAMILY_FIXTURES for c in (VEScheduler, VEHeunScheduler)]
COMMON_IDS = [f"{f}-{c.__name__}" for f, c in COMMON]


def _ours(family_key, cls, **kwargs):
    return cls.from_config(_fixture(FAMILY_FIXTURES[family_key]), **kwargs)


def _set(sched, n=4):
    kwargs = {"mu": 0.8} if sched.config.get("use_dynamic_shifting") else {}
    sched.set_timesteps(n, **kwargs)


def _plain(config):
    return {k: v for k, v in dict(config).items() if k != "_use_default_values"}


@pytest.mark.parametrize("family_key,cls", COMMON, ids=COMMON_IDS)
def test_save_load_and_from_config_round_trip(family_key, cls, tmp_path):
    sched = _ours(family_key, cls, reverse_noise=0.5)
    sched.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    again = cls.from_config(sched.config)
    for other in (loaded, again):
        assert _plain(other.config) == _plain(sched.config)
        assert other.config["model_family"] == sched.config["model_family"]
        _set(sched), _set(other)
        torch.testing.assert_close(other.timesteps, sched.timesteps)


@pytest.mark.parametrize("family_key", [f for f in FAMILY_FIXTURES if f != "vp-v"])
def test_compatibles_construct_and_come_back(family_key):
    scheds = [_ours(family_key, cls) for cls in (VEScheduler, VEHeunScheduler)]
    assert scheds[0].compatibles, "a scheduler with no compatibles cannot be swapped from the pipeline"
    assert {c.__name__ for c in scheds[0].compatibles} == {c.__name__ for c in scheds[1].compatibles}
    for other_cls in scheds[0].compatibles:
        if _is_dummy(other_cls):
            continue
        for sched in scheds:
            other = other_cls.from_config(sched.config)
            back = type(sched).from_config(other.config)
            assert back.config["model_family"] == sched.config["model_family"], other_cls.__name__
            _set(sched), _set(back)
            torch.testing.assert_close(back.timesteps, sched.timesteps, msg=other_cls.__name__)


@pytest.mark.parametrize("cls", [VEScheduler, VEHeunScheduler])
def test_trained_betas_round_trip(cls, tmp_path):
    betas = np.array([0.1, 0.2, 0.3, 0.4])
    sched = cls(num_train_timesteps=4, trained_betas=betas)
    assert sched.betas.tolist() == torch.tensor(betas, dtype=torch.float32).tolist()
    torch.testing.assert_close(sched.alphas, 1 - sched.betas)
    torch.testing.assert_close(sched.alphas_cumprod, torch.cumprod(1 - sched.betas, 0))
    sched.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.betas.tolist() == sched.betas.tolist()


@pytest.mark.parametrize("family_key,cls", COMMON, ids=COMMON_IDS)
def test_step_output_shapes(family_key, cls):
    sched = _ours(family_key, cls, reverse_noise=0.5)
    _set(sched, 3)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 8, 8, generator=g) * sched.init_noise_sigma
    for ts in sched.timesteps:
        model_in = sched.scale_model_input(sample, ts)
        assert model_in.shape == sample.shape
        output = torch.randn(sample.shape, generator=g) * 0.1
        out = sched.step(output, ts, sample, generator=g)
        assert out.prev_sample.shape == sample.shape and out.pred_original_sample.shape == sample.shape
        assert torch.isfinite(out.prev_sample).all()
        sample = out.prev_sample
    _set(sched, 3)
    tup = sched.step(output, sched.timesteps[0], sample, generator=g, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == sample.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family_key,cls", COMMON, ids=COMMON_IDS)
def test_add_noise_shape_dtype_and_value(family_key, cls, dtype):
    sched = _ours(family_key, cls)
    fam = process.model_family(_fixture(FAMILY_FIXTURES[family_key]))
    _set(sched, 5)
    g = torch.Generator().manual_seed(0)
    y, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    ts = sched.timesteps[1:4]
    noisy = sched.add_noise(y.to(dtype), eps.to(dtype), ts)
    assert noisy.shape == y.shape and noisy.dtype == dtype
    t = fam.t(ts.double()).view(-1, 1, 1, 1)
    expected = (fam.scale(t) * (y.double() + t.sqrt() * eps.double())).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(noisy, expected, rtol=tol, atol=tol * float(expected.abs().max()))
