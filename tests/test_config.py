import pytest
from transformers import HfArgumentParser

from sd_plugin import SaliencyDecorConfig
from sd_plugin.integrations.config import METHOD_FIELDS


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("method", "dbn", r"method='dbn' is not supported; allowed values are \('baseline', 'sgt'"),
        ("mask_fill", "noise", r"mask_fill='noise' is not supported"),
        ("mask_ratio", 1.0, r"mask_ratio=1.0 is out of range; use a fraction in \[0, 1\)"),
        ("mask_ratio", -0.1, r"mask_ratio=-0.1 is out of range"),
        ("decor_weight", -0.01, r"decor_weight=-0.01 is negative"),
        ("consistency_weight", -1.0, r"consistency_weight=-1.0 is negative"),
        ("consistency_grad", "none", r"consistency_grad='none' is not supported"),
        ("decor_target", "logits", r"decor_target='logits' is not supported"),
        ("saliency_target", "gradcam", r"saliency_target='gradcam' is not supported; allowed values are \('objective'"),
        ("group_size", 0, r"group_size=0 must be a positive divisor"),
        ("whitening_shrinkage", 2.0, r"whitening_shrinkage=2.0 must be in \[0, 1\]"),
    ],
)
def test_post_init__error_names_field_and_allowed_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        SaliencyDecorConfig(output_dir=str(tmp_path), **{field: value})


def test_defaults__paper_values_and_measured_ones(tmp_path):
    args = SaliencyDecorConfig(output_dir=str(tmp_path))
    assert (args.method, args.mask_ratio, args.consistency_weight) == ("saliencydecor", 0.25, 1.0)
    # decided by measurement (CHANGELOG): the paper's ablation weight, and the collapse-proof loss
    assert (args.decor_weight, args.decor_liveness_weight) == (0.001, 2.0)
    assert args.mask_fill == "random" and args.consistency_grad == "detached"


def test_hf_argument_parser__every_method_field_is_a_flag(tmp_path):
    parser = HfArgumentParser(SaliencyDecorConfig)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--method", "sgt", "--mask_ratio", "0.5", "--whiten_head_input", "false"]
    )
    assert args.method == "sgt" and args.mask_ratio == 0.5 and args.whiten_head_input is False
    flags = {action.dest for action in parser._actions}
    assert set(METHOD_FIELDS) <= flags
    assert {"method", "mask_ratio", "mask_fill", "decor_weight", "consistency_weight", "group_size"} <= set(
        METHOD_FIELDS
    )


def test_method_arguments__the_config_carries_the_one_dataclass_and_sync_resolves(tmp_path):
    from sd_plugin.core.arguments import SaliencyDecorArguments

    config = SaliencyDecorConfig(output_dir=str(tmp_path), method="sgt", whitening_compile=True)
    assert isinstance(config, SaliencyDecorArguments)
    arguments = config.method_arguments()
    assert type(arguments) is SaliencyDecorArguments and arguments.to_dict() == {
        name: getattr(config, name) for name in SaliencyDecorArguments.field_names()
    }
    assert set(SaliencyDecorArguments.field_names()) <= set(METHOD_FIELDS)
    assert arguments.sync_whitening_for(1) is False and arguments.sync_whitening_for(2) is True
    assert SaliencyDecorArguments(sync_whitening=False).sync_whitening_for(2) is False


def test_from_training_arguments__a_plain_config_keeps_its_values(tmp_path):
    from transformers import TrainingArguments

    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, seed=7, report_to="none")
    config = SaliencyDecorConfig.from_training_arguments(plain, group_size=8)
    assert (config.learning_rate, config.seed, config.group_size, config.method) == (3e-3, 7, 8, "saliencydecor")


def test_post_init__whitening_compile_with_consistency_grad_both_refused(tmp_path):
    with pytest.raises(ValueError, match="does not support consistency_grad='both'"):
        SaliencyDecorConfig(output_dir=str(tmp_path), whitening_compile=True, consistency_grad="both")
    # without the masking+decorrelation step there is no retained graph, so the pair is accepted
    SaliencyDecorConfig(output_dir=str(tmp_path), method="decor", whitening_compile=True, consistency_grad="both")


def test_one_dataclass__every_method_field_reaches_config_flags_metadata_card_and_identity(tmp_path):
    """A field declared in SaliencyDecorArguments needs no other declaration to reach every consumer."""
    from sd_plugin.core.arguments import EXECUTION_FIELDS, SETTING_FIELDS, SaliencyDecorArguments
    from sd_plugin.hub.card import render_model_card
    from sd_plugin.integrations.recipe_arguments import RecipeArguments
    from sd_plugin.integrations.recipe_checkpoints import run_identity

    fields = SaliencyDecorArguments.field_names()
    config = SaliencyDecorConfig(output_dir=str(tmp_path))
    assert all(hasattr(config, name) for name in fields)
    recipe_flags = {action.dest for action in HfArgumentParser((RecipeArguments, SaliencyDecorArguments))._actions}
    assert set(fields) <= recipe_flags and set(fields) <= set(METHOD_FIELDS)
    assert set(SETTING_FIELDS) == set(fields) - set(EXECUTION_FIELDS) - {"feature_layer"}
    card = render_model_card("m", "timm", metadata=SaliencyDecorArguments().to_dict())
    assert all(f"| `{name}` |" in card for name in SETTING_FIELDS)
    identity = run_identity(RecipeArguments(), SaliencyDecorArguments(), num_processes=1)
    scalar_fields = [name for name, value in SaliencyDecorArguments().to_dict().items() if value is not None]
    assert {name for name in scalar_fields if name not in EXECUTION_FIELDS} <= set(identity)
    assert not set(EXECUTION_FIELDS) & set(identity)
