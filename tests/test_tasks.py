"""Task layouts: the tutorial's printed grids, tasks.json round trip."""

import pytest

from hiad_pl.task import A2OTaskGenerator, NeighborhoodTaskGenerator, O2OTaskGenerator
from hiad_pl.tasks import Task, load_tasks, save_tasks, task_layout, thumbnail_task
from hiad_pl.utils.base import PrintTasks
from hiad_pl.utils.split_and_gather import MultiResolutionHRImageSpliter

INDEXES = MultiResolutionHRImageSpliter(image_size=2048, patch_size=512)

A2O = """Row: 4, Column: 4, Patch Number: 16, Task Number: 1
| task_0 | task_0 | task_0 | task_0 | 
| task_0 | task_0 | task_0 | task_0 | 
| task_0 | task_0 | task_0 | task_0 | 
| task_0 | task_0 | task_0 | task_0 | """

O2O = """Row: 4, Column: 4, Patch Number: 16, Task Number: 16
|  task_0  |  task_1  |  task_2  |  task_3  | 
|  task_4  |  task_5  |  task_6  |  task_7  | 
|  task_8  |  task_9  |  task_10 |  task_11 | 
|  task_12 |  task_13 |  task_14 |  task_15 | """

NEIGHBOURHOOD_2X2 = """Row: 4, Column: 4, Patch Number: 16, Task Number: 4
| task_0 | task_0 | task_1 | task_1 | 
| task_0 | task_0 | task_1 | task_1 | 
| task_2 | task_2 | task_3 | task_3 | 
| task_2 | task_2 | task_3 | task_3 | """

NEIGHBOURHOOD_3X1 = """Row: 4, Column: 4, Patch Number: 16, Task Number: 3
| task_0 | task_0 | task_1 | task_2 | 
| task_0 | task_0 | task_1 | task_2 | 
| task_0 | task_0 | task_1 | task_2 | 
| task_0 | task_0 | task_1 | task_2 | """


@pytest.mark.parametrize(
    "generator, expected",
    [
        (A2OTaskGenerator(), A2O),
        (O2OTaskGenerator(), O2O),
        (NeighborhoodTaskGenerator(num_groups_width=2, num_groups_height=2), NEIGHBOURHOOD_2X2),
        (NeighborhoodTaskGenerator(num_groups_width=2), NEIGHBOURHOOD_2X2),
        (NeighborhoodTaskGenerator(num_groups_width=3, num_groups_height=1), NEIGHBOURHOOD_3X1),
    ],
)
def test_tutorial_layouts(generator, expected, capsys):
    tasks = generator.create_tasks([], INDEXES)
    PrintTasks(tasks)
    assert capsys.readouterr().out == expected + "\n"
    assert sorted(str(i) for t in tasks for i in t.indexes) == sorted(str(i) for i in INDEXES)


def test_tasks_json_round_trip(tmp_path):
    tasks = NeighborhoodTaskGenerator(2).create_tasks([], MultiResolutionHRImageSpliter(2048, 512, ds_factors=[0, 1]))
    tasks.append(Task("task_r", tasks[0].indexes, centers=[[0.5, 0.25]]))
    tasks.append(thumbnail_task(256))
    path = save_tasks(tasks, tmp_path / "tasks.json")
    loaded = load_tasks(path)
    assert [t.todict() for t in loaded] == [t.todict() for t in tasks]
    assert loaded[-1].is_thumbnail and loaded[-1].thumbnail_size == (256, 256)
    assert "thumbnail" in task_layout(loaded)


def test_bad_task_inputs(tmp_path):
    with pytest.raises(ValueError, match="more groups"):
        NeighborhoodTaskGenerator(5).create_tasks([], INDEXES)
    with pytest.raises(ValueError, match="positive"):
        NeighborhoodTaskGenerator(0)
    with pytest.raises(ValueError, match="no patch indexes"):
        A2OTaskGenerator().create_tasks([], [])
    bad = tmp_path / "tasks.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        load_tasks(bad)
