"""Routing, pure: `choose(request, snapshot) -> Decision`, with no I/O.

    snapshot.py    the picture of the fleet the router decides from
    policy.py      decisions (Send, Wait, Reject) and the policies (residency, round-robin, ...)
    cost.py        the residency policy's cost model: expected time to first token per backend
"""
