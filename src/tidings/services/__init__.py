"""Use cases. They depend only on the Store and Bus interfaces and an injected Clock."""
