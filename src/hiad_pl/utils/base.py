"""Tutorial import path for task printing and task files."""

from hiad_pl.tasks.base import PrintTasks, load_tasks, save_tasks

__all__ = ["PrintTasks", "load_tasks", "save_tasks"]
