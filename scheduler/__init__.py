"""torpord: the scheduler daemon (pure policy core, asyncio gRPC services, worker supervision).

Nothing under this package imports torch.
"""
