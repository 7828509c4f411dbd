"""Plain-dict registries: `resolve(kind, table, what)` looks a name up and says what exists when it fails."""


class ConfigError(ValueError):
    """A config, a file or an argument is wrong; the message says where and what was expected."""


def resolve(kind, table, what="kind"):
    """Return `table[kind]`, or raise ConfigError naming the valid kinds.

    >>> resolve("adam", {"adam": 1, "sgd": 2}, "train.optimizer")
    1
    """
    try:
        return table[kind]
    except KeyError:
        valid = ", ".join(sorted(table))
        raise ConfigError(f"{what}: unknown value {kind!r}; expected one of: {valid}") from None
