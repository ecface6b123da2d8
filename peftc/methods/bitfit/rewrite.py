"""``bitfit [targets]``: train only biases (BitFit). A selected linear without a bias (LLaMA's) gets a zero
one, so the statement is meaningful on every architecture; no targets means every linear but the output
head. The trained biases are copies owned by the compiled model; merging freezes them in place."""
from __future__ import annotations

import dataclasses

from peftc.graph.owned import check_overlap, own
from peftc.compiler.passmanager import CompileContext, Pass, PassResult, register
from peftc.graph.targets import select_linears
from peftc.lang.spec import Target


@register
class BitfitPass(Pass):
    keyword = "bitfit"
    phase = "own-biases"

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        if not statement.targets:
            statement = dataclasses.replace(statement, targets=(Target("role", "all-linear", statement.span),))
        sites = select_linears(statement, ctx.sites, ctx.spec)
        check_overlap(ctx, statement, sites, self.keyword, ("bias",))
        for site in sites:
            ctx.records.append(own(ctx, site, self.keyword, statement, index, weight=False, bias=True))
        return PassResult(ctx.gm, modified=True)
