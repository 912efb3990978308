"""Test-wide settings: no analytics lookups, no Hub downloads, no LLM endpoint from the shell, small thread counts.

Forced rather than defaulted: a developer's shell (HF_HUB_OFFLINE=0, an OpenAI key) must not change what the
tests do or let them reach the network.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENSORA_LLM_BASE_URL", "OPENSORA_LLM_MODEL"):
    os.environ.pop(name, None)

pytest_plugins = ["tests.fake_llm"]  # the `fake_llm` fixture, for every test module
