"""Turn a JobCreate into a validated RecipeConfig, naming the offending field on failure."""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

from pydantic import ValidationError

from app.errors import InvalidRecipe, UnknownModel
from app.jobs.schemas import JobCreate
from app.models.tenant_models import TENANT_MODEL_PREFIX
from ml_core.config import RecipeConfig, build_config
from ml_core.registry import DEFAULT_MODELS, ModelRegistry

# Settings that decide where the worker sends data and which credentials it uses: the operator
# chooses them, never a tenant (a tenant-set endpoint could receive the operator's API key).
OPERATOR_ONLY = {
    ("generation", "backend"),
    ("generation", "endpoint"),
    ("generation", "api_key_env"),
}

# Top-level request fields and where they land in the recipe.
EXPLICIT = {
    ("student",): "base_model",
    ("teacher",): "teacher",
    ("generator",): "generator",
    ("generation", "query_types"): "query_types",
    ("generation", "passages"): "passages",
    ("training", "loss"): "loss",
}

# Which registry role each model field must have.
MODEL_ROLES = (("base_model", "student"), ("teacher", "teacher"), ("generator", "generator"))
# Helper retrievers are bi-encoders (role student) named in the recipe's candidates section.
HELPERS_FIELD = "hyperparameters.candidates.helpers"
CO_TEACHERS_FIELD = "hyperparameters.candidates.co_teachers"


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[path[-1]] = value


def _field_for(loc: tuple[Any, ...]) -> str:
    path = tuple(str(part) for part in loc)
    for recipe_path, field in EXPLICIT.items():
        if path[: len(recipe_path)] == recipe_path:
            return field
    return ".".join(("hyperparameters", *path))


def resolve_recipe(request: JobCreate) -> RecipeConfig:
    """The preset, then `hyperparameters`, then the explicit fields; validated by RecipeConfig."""
    overrides = copy.deepcopy(request.hyperparameters)
    for section, key in OPERATOR_ONLY:
        if isinstance(overrides.get(section), dict) and key in overrides[section]:
            raise InvalidRecipe(
                f"hyperparameters.{section}.{key} is set by the operator, not per job",
                field=f"hyperparameters.{section}.{key}",
            )
    explicit = {
        "base_model": request.base_model,
        "teacher": request.teacher,
        "generator": request.generator,
        "query_types": [str(t) for t in request.query_types] if request.query_types else None,
        "passages": request.passages,
        "loss": request.loss,
    }
    for path, field in EXPLICIT.items():
        if explicit[field] is not None:
            _set(overrides, path, explicit[field])
    try:
        recipe = build_config(request.preset, overrides)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0]
        field = _field_for(tuple(first["loc"]))
        raise InvalidRecipe(
            f"{field}: {first['msg']}",
            field=field,
            errors=[{"field": _field_for(tuple(e["loc"])), "message": e["msg"]} for e in errors],
        ) from exc
    _check_resolved(overrides, recipe)
    return recipe


# Seeds reach numpy's generators, which take 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


def _converted(sent: Any, resolved: Any, path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The first path where the recipe holds `sent` only by converting its JSON type (true for
    an integer, 4.0 or "4" for an integer, "0.5" for a number), or None."""
    if isinstance(sent, dict) and isinstance(resolved, dict):
        nested = (_converted(v, resolved[k], (*path, k)) for k, v in sent.items() if k in resolved)
        return next((found for found in nested if found), None)
    if isinstance(sent, list) and isinstance(resolved, list):
        items = (_converted(a, b, (*path, str(i)))
                 for i, (a, b) in enumerate(zip(sent, resolved, strict=False)))
        return next((found for found in items if found), None)
    if isinstance(sent, bool) or isinstance(resolved, bool):
        return None if type(sent) is type(resolved) else path
    if isinstance(resolved, int):
        return None if isinstance(sent, int) else path
    if isinstance(resolved, float):
        return None if isinstance(sent, int | float) else path
    return None


def _check_resolved(overrides: dict[str, Any], recipe: RecipeConfig) -> None:
    converted = _converted(overrides, recipe.model_dump(mode="json"), ())
    if converted is not None:
        field = _field_for(converted)
        raise InvalidRecipe(f"{field}: must be a JSON value of the setting's type "
                            f"(a number, not a string or a boolean; a whole number for "
                            f"an integer)", field=field)
    if not 0 <= recipe.seed <= MAX_SEED:
        raise InvalidRecipe(f"hyperparameters.seed: must be between 0 and {MAX_SEED}",
                            field="hyperparameters.seed")
    if recipe.training.tune != "both":
        # One-sided tuning yields an encoder that needs the base for the other side; a job's
        # export and /v1/embed serve one encoder for both, so it stays a benchmark setting.
        field = "hyperparameters.training.tune"
        raise InvalidRecipe(f"{field}: only 'both' is served: a job's model encodes queries "
                            f"and passages alike ('queries' and 'passages' are benchmark "
                            f"settings)", field=field)
    types = recipe.generation.query_types
    if len(set(types)) != len(types):
        field = _field_for(("generation", "query_types"))
        raise InvalidRecipe(f"{field}: each query type may be named once", field=field)


def with_deployment_generation(
    recipe: RecipeConfig, request: JobCreate, backend: str | None, endpoint: str | None,
    model: str | None,
) -> RecipeConfig:
    """The recipe with the deployment's generation backend (Settings.generation_backend).

    "openai": the OpenAI-compatible endpoint and the model it serves become the job's
    generation.endpoint and generator (a `generator` the request names must be that model);
    "vllm": the job's generator, a stored model, runs on vLLM; None or "transformers": as is.
    """
    if backend is None or backend == "transformers":
        return recipe
    resolved = recipe.model_dump()
    resolved["generation"]["backend"] = backend
    if backend == "openai":
        if request.generator is not None and request.generator != model:
            raise InvalidRecipe(
                f"generator: this deployment writes queries with {model!r} at its endpoint; "
                f"leave generator out (or name {model!r})",
                field="generator",
            )
        resolved["generation"]["endpoint"] = endpoint
        resolved["generator"] = model
    return RecipeConfig.model_validate(resolved)


def check_models(
    recipe: RecipeConfig, registry: ModelRegistry, own_models: Collection[str] = ()
) -> None:
    """Every model the recipe names exists in the registry with the right role (422 otherwise);
    the base model may also be one of the tenant's own (`own_models`: its `mdl_` ids). A
    generator served at an OpenAI-compatible endpoint is the deployment's, not a stored one."""
    names = {"base_model": recipe.student, "teacher": recipe.teacher, "generator": recipe.generator}
    checks = [(field, names[field], role) for field, role in MODEL_ROLES
              if not (field == "generator" and recipe.generation.backend == "openai")]
    checks += [(HELPERS_FIELD, name, "student") for name in recipe.candidates.helpers]
    checks += [(CO_TEACHERS_FIELD, name, "teacher") for name in recipe.candidates.co_teachers]
    for field, name, role in checks:
        if field == "base_model" and name.startswith(TENANT_MODEL_PREFIX):
            if name not in own_models:
                raise UnknownModel(f"base_model: {name} is none of your models",
                                   field="base_model")
            continue
        available = [spec.name for spec in registry.list(role)]
        try:
            spec = registry.get(name)
        except KeyError:
            # A catalogued model this deployment has not installed: say so, and who can fix it.
            hint = (f"; {name!r} is in Tailor's catalogue but not installed here (an operator "
                    f"installs it with `python -m ml_core provision {name}`)"
                    if name in DEFAULT_MODELS else "")
            raise UnknownModel(
                f"{field}: unknown model {name!r}; available: {', '.join(available) or 'none'}"
                f"{hint}",
                field=field,
                available=available,
            ) from None
        if spec.role != role:
            raise UnknownModel(
                f"{field}: model {name!r} is a {spec.role}, not a {role}",
                field=field,
                available=available,
            )
