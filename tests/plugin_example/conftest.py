"""The example distribution is tested from tests/test_plugin_example.py, loaded as an installed
third-party plugin; nothing in here is collected on its own."""

collect_ignore_glob = ["*"]
