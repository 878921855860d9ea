"""Load for restart and fault tests: agents calling the gateway in a loop."""

from __future__ import annotations

import threading

import openai


class Agent(threading.Thread):
    """Calls the gateway in a loop until stopped; connection errors (a gateway restarting)
    are retried after a short pause, as an agent's SDK retries would. ``hold`` parks it
    between two calls (``idle`` is set then), so a process can be killed with no call in
    flight."""

    def __init__(self, client: openai.OpenAI) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.stop = threading.Event()
        self.hold = threading.Event()
        self.idle = threading.Event()
        self.answered = 0
        self.failed = 0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            if self.hold.is_set():
                self.idle.set()
                self.stop.wait(0.01)
                continue
            self.idle.clear()
            n += 1
            try:
                self.client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"Step {n} now."}]
                )
                self.answered += 1
            except openai.APIError:
                self.failed += 1
                self.stop.wait(0.05)

    def finish(self) -> None:
        self.stop.set()
        self.join(15)
