"""The responses /v1/responses keeps for previous_response_id and GET (server/responses.py), in memory."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Optional

from pangu_infer.errors import short_repr
from pangu_infer.server.errors import APIError

MAX_STORED = 1024  # responses kept for previous_response_id and GET, newest first
MAX_STORED_BYTES = 256 << 20  # and at most this much of their JSON: one client's huge inputs cannot fill memory


class ResponseStore:
    """The newest MAX_STORED responses, MAX_STORED_BYTES of JSON at most: each one's JSON and its
    conversation (chat messages, the reply included) for a later previous_response_id. A response
    bigger than the whole budget is not kept."""

    def __init__(self, capacity: int = MAX_STORED, max_bytes: int = MAX_STORED_BYTES):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[dict, list[dict], list[dict], int]] = OrderedDict()

    def put(self, response: dict, messages: list[dict], inputs: Optional[list[dict]] = None) -> bool:
        """Keep it (True), evicting the oldest as needed; False when it alone is over the budget.
        inputs: the request's own input items (input_items_of), for GET .../input_items."""
        inputs = inputs or []
        size = sum(len(json.dumps(part, ensure_ascii=False)) for part in (response, messages, inputs))
        if size > self.max_bytes:
            return False
        self._items[response["id"]] = (response, messages, inputs, size)
        self.bytes += size
        while len(self._items) > self.capacity or self.bytes > self.max_bytes:
            self.bytes -= self._items.popitem(last=False)[1][3]
        return True

    def get(self, response_id: str, param: Optional[str] = None) -> tuple[dict, list[dict]]:
        item = self._items.get(response_id)
        if item is None:
            raise APIError(404, f"no response with id {short_repr(response_id)} is stored here (only the newest {self.capacity}, "
                           f"{self.max_bytes >> 20} MiB in all, are kept)", param=param, code="not_found")
        return item[0], item[1]

    def input_items(self, response_id: str, limit: int, order: str, after: Optional[str]) -> dict:
        """OpenAI's list of a response's input items: newest first unless order is "asc", from
        after the item `after`, at most `limit` (1-100)."""
        self.get(response_id)
        if not 1 <= limit <= 100:
            raise APIError(400, f"limit={short_repr(limit)}: expected 1 to 100", param="limit")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order={short_repr(order)}: expected asc or desc", param="order")
        items = list(self._items[response_id][2])
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise APIError(400, f"after={short_repr(after)} is not an input item of {short_repr(response_id)}", param="after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        self.bytes -= self._items.pop(response_id)[3]
