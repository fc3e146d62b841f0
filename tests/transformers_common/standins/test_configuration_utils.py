"""Stand-in for transformers' `tests/utils/test_configuration_utils.py` (not in the release's source distribution).

`ConfigTester.check_config_arguments_init` reads `config_common_kwargs` only for configs without sub-configs."""

config_common_kwargs = {}
