from tandem.kvcache.cache import KVCache

__all__ = ["KVCache"]
