"""The record protocol: what one pass inserted for one site, and everything the rest of peftc asks of it.

Every method's record (``LoraRecord``, ``Ia3Record``, ``OwnedRecord``...) is a dataclass subclassing
:class:`Record`. Consumers (``adapter_parameters``, ``merge``, the report, the export's sequence limit, the
file formats) use these names and nothing else: no ``getattr`` with a default on a record anywhere."""
from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from torch.fx import GraphModule

from peftc.errors import PassError


class Record:
    """One pass's insertion at one site. Subclasses are dataclasses with at least these fields."""
    #: the index of the spec statement that inserted it
    statement: int
    #: the method keyword (``lora``, ``bitfit``...)
    method: str
    #: what it sits on (a linear site, an attention, the embedding): anything with ``path`` and ``layer``;
    #: a model-wide record with no site (the prefix encoder) overrides :attr:`key` and :attr:`layer` instead
    site: Any
    #: the attribute name of its submodule on the graph module
    module: str
    #: the names of the graph nodes it inserted, in graph order
    nodes: list[str]
    #: whether :meth:`fold` merges it into the base weights (a prefix, say, stays a graph op)
    foldable: ClassVar[bool] = False

    @property
    def key(self) -> str:
        """Its name in ``adapter_parameters()`` and in peftc's adapter file: the site's module path."""
        return self.site.path

    @property
    def layer(self) -> int | None:
        """The decoder layer it acts in, or None for a model-wide record (the embedding, the head)."""
        return self.site.layer

    @property
    def positions(self) -> int:
        """Sequence positions it takes from the model's maximum length (soft prompts, shifted prefixes)."""
        return 0

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        """Its trainable parameters by their short name (``lora_A``...)."""
        return {}

    def folded_weights(self) -> dict[str, str | None]:
        """After :meth:`fold`: the weights it left on the graph module under names of its own, by attribute
        name, each with the base weight it stands for (a quantized linear's dequant(W) replaces the weight
        that was quantized; None where the base has no such weight, as a bias bitfit added). Merge casts
        them to the base dtype; a Hugging Face checkpoint stores them under the base weight's name."""
        return {}

    def fold(self, gm: GraphModule) -> None:
        """Merge it into the base weights of ``gm`` and remove what it inserted (``foldable`` records)."""
        raise PassError(f"a {self.method} record at {self.key} does not fold into the base weights")
