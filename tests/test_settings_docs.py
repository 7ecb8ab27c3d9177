"""Every setting an operator can set is documented, under the name the environment uses."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def test_every_setting_is_in_the_operations_settings_table() -> None:
    text = DOCS.read_text(encoding="utf-8")
    table = text[text.index("\n## Settings\n"):]
    prefix = Settings.model_config.get("env_prefix", "")
    missing = [f"{prefix}{name}".upper() for name in Settings.model_fields
               if f"`{prefix}{name}`".upper().replace("`", "") not in table.replace("`", "")]
    assert missing == [], f"settings missing from docs/operations.md#settings: {missing}"
