from tandem.engine.core import Engine
from tandem.engine.events import Finished, GenStats, Token

__all__ = ["Engine", "Finished", "GenStats", "Token"]
