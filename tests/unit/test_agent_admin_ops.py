"""Administrative volume operations (move, repair, maintenance) run one at a time on
the coordinator: a second one is refused with a sentence, never run underneath."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from shoal.agent import volume_ops
from shoal.agent.errors import AgentError


class HeldMove:
    """The parts of CoordinatorRole the operations use; its hand-over runs until released."""

    def __init__(self, rt: Any):
        self.rt = rt
        self.serving = True
        self.admin = asyncio.Lock()
        self.admin_what = ""
        self.moving = asyncio.Event()
        self.release = asyncio.Event()

    @property
    def me(self) -> str:
        return str(self.rt.node)

    async def hand_over(self, target: str, *, planned: bool) -> dict[str, Any]:
        self.moving.set()
        await self.release.wait()
        return {"to": target, "planned": planned}


def test_nothing_else_runs_while_a_move_runs() -> None:
    async def main() -> None:
        rt = SimpleNamespace(node="node1", name="vol1", epoch=1, maintenance=False)
        role = rt.role = HeldMove(rt)
        move = asyncio.create_task(volume_ops._move(rt, "node2", {"to": "node3"}))
        await asyncio.wait_for(role.moving.wait(), 10)
        with pytest.raises(AgentError, match="vol1 is busy: the move to node3 is running on node1; "
                                             "retry the defrag repair when it has finished"):
            await volume_ops._repair(rt, "node2", {"kind": "defrag"})
        with pytest.raises(AgentError, match="busy: the move to node3 .* retry maintenance off"):
            await volume_ops._maintenance_set(rt, "node2", {"on": False})
        with pytest.raises(AgentError, match="busy: the move to node3 .* retry the move to node2"):
            await volume_ops._move(rt, "node3", {"to": "node2"})
        assert not role.release.is_set() and not move.done(), "the refusals did not wait for the move"
        role.release.set()
        assert await asyncio.wait_for(move, 10) == {"to": "node3", "planned": True}
        assert not role.admin.locked() and role.admin_what == ""

    asyncio.run(main())


def test_a_refusal_travels_to_the_node_that_asked_as_its_sentence() -> None:
    async def main() -> None:
        rt = SimpleNamespace(node="node1", name="vol1", epoch=1, maintenance=False, role=None)
        agent = SimpleNamespace(name="node1", volumes={"vol1": rt})
        with pytest.raises(volume_ops.RemoteError, match="node1 is not coordinator of vol1"):
            await volume_ops.peer_request(agent, "node2", "csv.move", {"volume": "vol1", "to": "node3"}, b"")

    asyncio.run(main())
