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


def test_every_recipe_setting_is_in_the_recipe_doc() -> None:
    from ml_core.config import build_config

    text = (DOCS.parent / "recipe.md").read_text(encoding="utf-8")
    table = text[text.index("\n## Every setting\n"):]
    dumped = build_config("default").model_dump(mode="json")
    names = [f"{section}.{key}" for section, values in dumped.items()
             if isinstance(values, dict) for key in values]
    names += [section for section, values in dumped.items() if not isinstance(values, dict)]
    missing = [name for name in names if f"| `{name}` |" not in table]
    assert missing == [], f"recipe settings missing from docs/recipe.md#every-setting: {missing}"
