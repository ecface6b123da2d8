"""``full targets``: plain fine-tuning of the selected linears' weights and biases, for comparison runs.
The compiled model trains its own copies (a head tied to the embedding is untied: only the head trains);
merging freezes them in place."""
from __future__ import annotations

from peftc.graph.owned import check_overlap, own
from peftc.compiler.passmanager import CompileContext, Pass, PassResult, register
from peftc.graph.targets import select_linears


@register
class FullPass(Pass):
    keyword = "full"
    phase = "own-weights"

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        sites = select_linears(statement, ctx.sites, ctx.spec)
        check_overlap(ctx, statement, sites, self.keyword, ("weight", "bias"))
        for site in sites:
            ctx.records.append(own(ctx, site, self.keyword, statement, index, weight=True,
                                   bias=site.bias is not None))
        return PassResult(ctx.gm, modified=True)
