"""`gridworld`: walk to the goal on a small grid, in words (the shipped CPU environment).

A task (seed) places the agent and the goal on distinct cells of a rows x cols grid. Each turn the
agent names a move: up, down, left or right; walking into the border leaves it where it is. Reaching
the goal ends the episode with `goal_reward` (info["success"]). With `progress_reward` > 0 every valid
move also earns progress_reward x (the decrease of the Manhattan distance to the goal): +1 step closer,
-1 step away, 0 into a wall (potential-based shaping: the best policy stays the best). An action is valid when it names exactly
direction: the first one it names is the move ("left", "go left", "left, then up"); an action naming none
("jump", nothing) is invalid: the observation says so and the agent stays. With `slip` > 0 a valid move is replaced by a
random one with that probability, drawn from the instance's own RNG (saved in checkpoints).

The observation says where the goal is: relative to the agent ("Goal: 2 down, 1 left.", the default:
a compass, so a tiny model can learn to read it in minutes) or both positions in absolute terms
("You: row 1, col 3. Goal: row 3, col 2."). Either way it is a function of the cell only, so the same
cell met again in any trajectory of a task is the same observation: the anchor states GiGPO groups
steps by.
"""

from __future__ import annotations

import random
import re

from wz_engine.envs.base import register_env

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_MOVE_WORDS = re.compile(r"\b(up|down|left|right)\b", re.IGNORECASE)


@register_env("gridworld")
class GridWorld:
    def __init__(self, rows: int = 3, cols: int = 3, slip: float = 0.0, goal_reward: float = 1.0,
                 progress_reward: float = 0.0, observe: str = "relative", seed: int = 0):
        if rows < 1 or cols < 1 or rows * cols < 2:
            raise ValueError(f"gridworld: needs at least two cells, got rows={rows}, cols={cols}")
        if not 0 <= slip <= 1:
            raise ValueError(f"gridworld: slip must be in [0, 1], got {slip}")
        if observe not in ("relative", "absolute"):
            raise ValueError(f"gridworld: observe must be 'relative' or 'absolute', got {observe!r}")
        self.rows, self.cols, self.slip, self.goal_reward = rows, cols, slip, goal_reward
        self.observe, self.progress_reward = observe, progress_reward
        self.rng = random.Random(seed)
        self.pos = self.goal = (0, 0)
        self.done = True

    # -- protocol ---------------------------------------------------------------------------------
    def reset(self, seed: int) -> tuple[str, dict]:
        cells = [(r, c) for r in range(self.rows) for c in range(self.cols)]
        self.pos, self.goal = random.Random(seed).sample(cells, 2)
        self.done = False
        return self._observation(), {"instruction": self.instruction()}

    def step(self, action: str | None) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("gridworld: step after the episode ended (reset first)")
        move = parse_move(action)
        if move is None:
            return "Invalid action. " + self._observation(), 0.0, False, {"invalid": True}
        if self.slip and self.rng.random() < self.slip:
            move = self.rng.choice(sorted(MOVES))
        dr, dc = MOVES[move]
        before = self._distance()
        self.pos = (min(max(self.pos[0] + dr, 0), self.rows - 1), min(max(self.pos[1] + dc, 0), self.cols - 1))
        progress = self.progress_reward * (before - self._distance())
        if self.pos == self.goal:
            self.done = True
            return "You reached the goal.", self.goal_reward + progress, True, {"success": True}
        return self._observation(), progress, False, {}

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])

    def corpus(self) -> list[str]:
        """Every text the env can show, and the moves (a tiny model's tokenizer is trained on these)."""
        cells = [(r, c) for r in range(self.rows) for c in range(self.cols)]
        texts = [self.instruction(), "Invalid action.", "You reached the goal.", *MOVES]
        for pos in cells:
            for goal in cells:
                if pos != goal:
                    texts.append(_describe(pos, goal, self.observe))
        return texts

    def _distance(self) -> int:
        return abs(self.goal[0] - self.pos[0]) + abs(self.goal[1] - self.pos[1])

    # -- text -------------------------------------------------------------------------------------
    def instruction(self) -> str:
        return f"Reach the goal ({self.rows}x{self.cols} grid)."

    def _observation(self) -> str:
        return _describe(self.pos, self.goal, self.observe)


def parse_move(action: str | None) -> str | None:
    """The first direction the action names (lower case), or None when it names none."""
    found = _MOVE_WORDS.search(action) if action is not None else None
    return found.group(1).lower() if found else None


def _describe(pos: tuple[int, int], goal: tuple[int, int], observe: str) -> str:
    if observe == "absolute":
        return f"You: row {pos[0] + 1}, col {pos[1] + 1}. Goal: row {goal[0] + 1}, col {goal[1] + 1}."
    dr, dc = goal[0] - pos[0], goal[1] - pos[1]
    parts = ([f"{abs(dr)} {'down' if dr > 0 else 'up'}"] if dr else []) + \
        ([f"{abs(dc)} {'right' if dc > 0 else 'left'}"] if dc else [])
    return f"Goal: {', '.join(parts)}."
