"""Recipe reading lives in the library (:mod:`prunecli.recipe`); these names are kept for the CLI."""

from prunecli.recipe import (  # noqa: F401
    COMMAND_LINE_ONLY,
    COMMON_FIELDS,
    RECIPE_KEYS,
    coerce_options,
    convert,
    load_recipe,
    method_fields,
    parse_set,
)
