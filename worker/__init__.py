"""The Theater worker: one process per agent, hardened, running one component under limits."""

__all__: list[str] = []
