"""Synthetic query generation: prompts for six query types, LLM backends, and the generate step."""

from ml_core.generation.backends import (
    Conversation,
    Generator,
    GeneratorError,
    OpenAIGenerator,
    TransformersGenerator,
    VLLMGenerator,
    load_generator,
)
from ml_core.generation.generate import clean_query, generate_queries, query_id
from ml_core.generation.prompts import EXAMPLES, INSTRUCTIONS, build_messages

__all__ = [
    "EXAMPLES",
    "INSTRUCTIONS",
    "Conversation",
    "Generator",
    "GeneratorError",
    "OpenAIGenerator",
    "TransformersGenerator",
    "VLLMGenerator",
    "build_messages",
    "clean_query",
    "generate_queries",
    "load_generator",
    "query_id",
]
