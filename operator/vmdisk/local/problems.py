"""The error of invalid manifests, apart from the loader (the CLI catches it without
loading YAML or the models)."""


class ManifestError(Exception):
    """One or more manifests are invalid; ``problems`` name file, object and field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
