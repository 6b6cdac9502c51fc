"""GGUFReader with array metadata parsed in one pass (stock gguf-py takes ~15 s on Gemma's 262k-entry vocab)."""

from __future__ import annotations

import struct

import numpy as np


def _fast_reader_class():
    """GGUFReader with array metadata parsed in one pass over a memoryview.

    Stock gguf-py builds two numpy memmap views per array element, which takes ~15 s for Gemma's 262k-entry vocab.
    Here a numeric array is one numpy part and a string array one memoryview part per string (length prefixes
    are not kept as parts), so `ReaderField.contents()` returns the same values; only `len(field.data)` of a
    numeric array differs (1). Byte-swapped files and nested arrays use the stock code.
    """
    from gguf import GGUFReader, GGUFValueType

    class FastGGUFReader(GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if int(raw_type) != int(GGUFValueType.ARRAY) or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            mv = self.__dict__.get("_tandem_mv")
            if mv is None:
                mv = self._tandem_mv = memoryview(self.data).cast("B")
            size = len(mv)
            if orig_offs + 12 > size:
                raise ValueError(f"array header at offset {orig_offs} runs past the end of the file ({size} bytes)")
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype = GGUFValueType(int(raw_itype[0]))
            n = int(alen[0])
            offs = orig_offs + 12
            parts: list = [raw_itype, alen]
            idxs: list[int] = []
            if itype == GGUFValueType.STRING:
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(n):
                    if offs + 8 > size:
                        raise ValueError(f"string array at offset {orig_offs} runs past the end of the file")
                    (slen,) = unpack(mv, offs)
                    end = offs + 8 + slen
                    if end > size:
                        raise ValueError(f"string array at offset {orig_offs} runs past the end of the file")
                    parts.append(mv[offs + 8:end])
                    idxs.append(len(parts) - 1)
                    offs = end
            elif itype in self.gguf_scalar_to_np:
                dt = np.dtype(self.gguf_scalar_to_np[itype])
                end = offs + dt.itemsize * n
                if end > size:
                    raise ValueError(f"array at offset {orig_offs} runs past the end of the file")
                parts.append(np.frombuffer(mv[offs:end], dtype=dt))  # one part: contents() flattens it
                idxs = [len(parts) - 1] if n else []
                offs = end
            else:
                return super()._get_field_parts(orig_offs, raw_type)
            types = [GGUFValueType.ARRAY] + ([itype] if n else [])
            return offs - orig_offs, parts, idxs, types

    return FastGGUFReader


_READER_CLS = None


def _reader(path: str):
    global _READER_CLS
    if _READER_CLS is None:
        _READER_CLS = _fast_reader_class()
    return _READER_CLS(path, "r")
