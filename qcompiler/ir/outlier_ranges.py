"""The ranges of the W8A8S outlier settings (sigma, fraction): one source for every entry point that sets them.

Torch-free on purpose: `qcompile quant --help` reads msmodelslim_flags.py, which imports these, before torch is
imported (tests/test_cli_errors.py test_help_and_a_bad_option_answer_without_importing_torch). The math they
parameterize is ir/qspec.py OutlierSplit.
"""

#: The one range of the W8A8S outlier settings, for every entry point that sets them (`--passes w8a8s:sigma=` /
#: `fraction=`, `sparse:fraction=`, `qcompile quant --sigma_factor` / `--fraction`, a modelslim_v0 YAML's
#: calib_cfg): msModelSlim msmodelslim/pytorch/llm_ptq/llm_ptq_tools/quant_config/quant_config_classes/
#: config_utils.py `check_lowbit_config`: `check_number(config.sigma_factor, float, 3.0, 4.0)`, and
#: `check_sparse_config`: `check_number(config.fraction, float, 0.01, 0.1)` (both run for every QuantConfig;
#: closed ranges). The flag tables of example/{Llama,Qwen,...}/README.md say sigma_factor [1.0, 3.0]: that
#: contradicts the check (1.0..2.99 raise) and the DeepSeek README's own `--sigma_factor 4.0`.
SIGMA_FACTOR_RANGE = (3.0, 4.0)
OUTLIER_FRACTION_RANGE = (0.01, 0.1)


def check_outlier_settings(fraction: float, sigma: float | None) -> None:
    """ValueError unless `sigma` (None: off) is in SIGMA_FACTOR_RANGE and `fraction` is 0 (off) or in
    OUTLIER_FRACTION_RANGE (a pass option's range; OutlierSplit itself, the reference math, takes any)."""
    lo, hi = SIGMA_FACTOR_RANGE
    if sigma is not None and not lo <= sigma <= hi:
        raise ValueError(f"sigma {sigma} must be in [{lo}, {hi}], the range of msModelSlim's sigma_factor "
                         f"(config_utils.check_lowbit_config)")
    lo, hi = OUTLIER_FRACTION_RANGE
    if fraction and not lo <= fraction <= hi:
        raise ValueError(f"fraction {fraction} must be 0 (off) or in [{lo}, {hi}], the range of msModelSlim's "
                         f"fraction (config_utils.check_sparse_config)")
