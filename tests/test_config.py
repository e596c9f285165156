"""Config: the published presets, overrides and refusals."""

import pytest

from leo.core.config import PRESETS, LEOConfig, config_from_dict, make_config
from leo.utils.errors import LeoInputError


def test_presets_carry_the_published_hyperparameters():
    c = make_config("mini-1shot")
    assert (c.outer_lr, c.l2_penalty_weight, c.orthogonality_penalty_weight) == (
        2.739071e-4,
        3.623413e-10,
        0.188103,
    )
    assert (c.dropout, c.kl_weight, c.encoder_penalty_weight, c.num_shots) == (
        0.307651,
        0.756143,
        5.756821e-6,
        1,
    )
    t = make_config("tiered-5shot")
    assert (t.outer_lr, t.kl_weight, t.num_shots) == (6.110314e-4, 1.622811, 5)
    assert set(PRESETS) == {"default", "mini-1shot", "mini-5shot", "tiered-1shot", "tiered-5shot"}


def test_reference_defaults():
    c = LEOConfig()
    assert (c.batch_size, c.num_queries, c.latent_dim, c.inner_steps, c.finetune_steps) == (
        12,
        15,
        64,
        5,
        5,
    )
    assert (c.inner_lr_init, c.finetune_lr_init, c.gradient_threshold) == (1.0, 1e-3, 0.1)


def test_overrides_and_round_trip():
    c = make_config("mini-5shot", num_steps=7, hidden_dim=256)
    assert c.num_steps == 7 and c.hidden_dim == 256 and c.num_shots == 5
    assert config_from_dict(c.to_dict()) == c


def test_eval_step_counts_default_to_training_ones():
    assert make_config(inner_steps=3).test_inner_steps == 3
    assert make_config(inner_steps=3, eval_inner_steps=6).test_inner_steps == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "mini-2shot"}, "unknown LEO preset 'mini-2shot'"),
        ({"latnet_dim": 3}, "LEO config: latnet_dim: unknown key$"),
        ({"dropout": 1.0}, r"LEO config: dropout: must be less than 1 \(got 1\.0\)$"),
        ({"form": "magic"}, "LEO config: form: must be 'fast' or 'literal' \\(got 'magic'\\)$"),
        ({"num_steps": 0}, "LEO config: num_steps: must be greater than or equal to 1"),
        ({"outer_lr": "1e-3"}, "LEO config: outer_lr: must be a valid number"),
        ({"num_shots": True}, "LEO config: num_shots: must be a valid integer"),
        ({"compile": "yes"}, "LEO config: compile: must be a valid boolean or must be 'auto'"),
        ({"l2_penalty_weight": 0.0}, "LEO config: l2_penalty_weight: must be greater than 0"),
    ],
)
def test_bad_config_is_refused_naming_the_key(kwargs, message):
    with pytest.raises(LeoInputError, match=message):
        make_config(**kwargs)


def test_compile_auto_means_cuda_only():
    from leo.utils.compiling import should_compile

    assert make_config().compile == "auto"
    assert not should_compile("auto", "cpu") and should_compile("auto", "cuda")
    assert should_compile(True, "cpu") and not should_compile(False, "cuda")


def test_maml_step_size_default_follows_the_shots():
    from leo.comparison.maml import make_maml_config

    assert make_maml_config(num_shots=1).inner_lr == 1.0
    assert make_maml_config(num_shots=5).inner_lr == 0.1
    assert make_maml_config(num_shots=5, inner_lr=0.3).inner_lr == 0.3
    with pytest.raises(LeoInputError, match="MAML config: inner_stepz: unknown key"):
        make_maml_config(inner_stepz=3)
