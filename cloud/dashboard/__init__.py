"""The operator dashboard (Starlette app in :mod:`.app`, CLI in :mod:`.cli`)."""
