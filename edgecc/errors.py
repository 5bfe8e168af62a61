"""User-facing errors.

Every mistake a user can make (bad file, unknown target, wrong input) raises `EdgeccError` with a one-line
message naming the problem and a hint naming the fix. The CLI prints exactly that line and exits non-zero;
tracebacks are reserved for bugs in edgecc itself.
"""


class EdgeccError(Exception):
    """A problem with the user's input or environment, with the fix to apply."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        if self.fix:
            return f"{self.problem} (fix: {self.fix})"
        return self.problem
