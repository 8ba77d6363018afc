"""`pipelines.beam_memo`: Beam's look at a DoFn for state and timers, and its options' views, the same answers, worked
out once."""

from __future__ import annotations

import gc
import weakref

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners import common
from apache_beam.transforms import userstate
from apache_beam.transforms.timeutil import TimeDomain

from pipelines.beam_memo import RememberedViews, remember_dofn_specs, remember_function_args

BAG = userstate.BagStateSpec("seen", VarIntCoder())
TIMER = userstate.TimerSpec("flush", TimeDomain.WATERMARK)


class Stateful(beam.DoFn):
    def process(self, element, seen=beam.DoFn.StateParam(BAG), flush=beam.DoFn.TimerParam(TIMER)):
        yield element

    @userstate.on_timer(TIMER)
    def flushed(self, seen=beam.DoFn.StateParam(BAG)):
        yield from seen.read()


class Plain(beam.DoFn):
    def process(self, element):
        yield element


class Twice(beam.DoFn):
    def process(self, element, a=beam.DoFn.StateParam(BAG), b=beam.DoFn.StateParam(BAG)):
        yield element


class Unhashable(Plain):
    __hash__ = None


@pytest.fixture
def inspections(monkeypatch):
    """How many methods Beam's own `get_dofn_specs` has inspected (it wraps each in a `MethodWrapper`)."""
    remember_dofn_specs()
    count = [0]

    class Counted(common.MethodWrapper):
        def __init__(self, *args, **kwargs):
            count[0] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(common, "MethodWrapper", Counted)
    return count


def test_the_answers_are_beams(inspections):
    beams = userstate.get_dofn_specs.__wrapped__
    for dofn in (Stateful(), Plain(), beam.Map(len).dofn, Unhashable()):
        assert userstate.get_dofn_specs(dofn) == beams(dofn)
    assert userstate.get_dofn_specs(Stateful()) == ({BAG}, {TIMER})
    assert userstate.is_stateful_dofn(Stateful()) and not userstate.is_stateful_dofn(Plain())


def test_each_dofn_is_looked_at_once_and_forgotten_when_it_goes(inspections):
    dofn = Stateful()
    state, timers = userstate.get_dofn_specs(dofn)
    looked = inspections[0]
    assert looked > 0
    state.clear()  # the caller's own sets: the next answer is whole
    assert userstate.get_dofn_specs(dofn) == ({BAG}, {TIMER}) and userstate.is_stateful_dofn(dofn)
    assert inspections[0] == looked  # not looked at again
    userstate.get_dofn_specs(Stateful())  # another instance is looked at
    assert inspections[0] == 2 * looked
    gone = weakref.ref(dofn)
    del dofn
    gc.collect()
    assert gone() is None  # its answer does not keep it


def test_a_dofn_that_cannot_be_remembered_or_is_wrong_is_asked_about_each_time(inspections):
    unhashable = Unhashable()
    userstate.get_dofn_specs(unhashable)
    looked = inspections[0]
    assert userstate.get_dofn_specs(unhashable) == (set(), set()) and inspections[0] == 2 * looked
    for _ in range(2):
        with pytest.raises(ValueError, match="duplicate"):
            userstate.get_dofn_specs(Twice())


def test_installed_once_in_beams_place():
    remember_dofn_specs()
    ours = userstate.get_dofn_specs
    remember_dofn_specs()
    assert userstate.get_dofn_specs is ours and ours.__wrapped__.__module__ == userstate.__name__


def test_each_view_of_the_options_is_made_once_and_answers_as_a_new_one(monkeypatch):
    flags = ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"]
    options = RememberedViews(flags)
    made = []
    view_as = PipelineOptions.view_as
    monkeypatch.setattr(PipelineOptions, "view_as", lambda self, cls: made.append(cls) or view_as(self, cls))
    direct = options.view_as(DirectOptions)
    assert options.view_as(DirectOptions) is direct and made == [DirectOptions]
    assert direct.direct_num_workers == 2 and options.view_as(StandardOptions).runner == "FnApiRunner"
    direct.direct_num_workers = 3  # set through one view: seen through the others, as with Beam's own views
    plain = PipelineOptions(flags)
    plain.view_as(DirectOptions).direct_num_workers = 3
    for view in (options.view_as(DirectOptions), PipelineOptions.view_as(options, DirectOptions)):
        assert view.direct_num_workers == plain.view_as(DirectOptions).direct_num_workers == 3
    assert options.get_all_options() == plain.get_all_options()


def test_an_embed_runs_options_remember_their_views():
    from pipelines.embed import EmbedConfig, _pipeline_options

    options = _pipeline_options(EmbedConfig(catalog="-", model="-", out="-"), [])
    assert isinstance(options, RememberedViews) and options.view_as(StandardOptions).runner == "FnApiRunner"


@pytest.fixture
def signatures(monkeypatch):
    """How many signatures Beam's own `get_function_args_defaults` has read."""
    from apache_beam.transforms import core

    remember_function_args()
    count = [0]
    read = core.get_signature

    def counted(f):
        count[0] += 1
        return read(f)

    monkeypatch.setattr(core, "get_signature", counted)
    return count


class Sized:
    def __call__(self, element, scale=2):
        return element * scale


class UnhashableSized(Sized):
    __hash__ = None


class Slotted:  # no weak reference to it
    __slots__ = ()

    def __call__(self, element):
        return element


def _with_defaults(element, side=3, *rest, flag=True):
    return element


def test_the_functions_arguments_are_beams(signatures):
    import functools

    from apache_beam.transforms import core

    beams = core.get_function_args_defaults.__wrapped__
    for f in (lambda x, y=1: x, _with_defaults, Plain().process, Plain.process, Stateful().process,
              functools.partial(_with_defaults, side=4), Sized(), len, UnhashableSized(), Slotted()):  # fmt: skip
        assert core.get_function_args_defaults(f) == beams(f), f
    assert core.get_function_args_defaults(Stateful().process)[0] == ["element", "seen", "flush"]  # no `self`
    assert core.get_function_args_defaults(Stateful.process)[0][0] == "self"  # the function itself: with it


def test_each_function_is_read_once_and_forgotten_when_it_goes(signatures):
    from apache_beam.transforms import core

    def f(element, side=3):
        return element

    args, defaults = core.get_function_args_defaults(f)
    assert signatures[0] == 1
    args.append("x")  # the caller's own lists: the next answer is whole
    assert core.get_function_args_defaults(f) == (["element", "side"], [3]) and signatures[0] == 1

    class Fresh(beam.DoFn):  # its methods not yet read in this process
        def process(self, element, side=1):
            yield element

    assert core.get_function_args_defaults(Fresh().process) == (["element", "side"], [1]) and signatures[0] == 2
    core.get_function_args_defaults(Fresh().process)  # another instance's method: its class's function, known
    assert signatures[0] == 2
    gone = weakref.ref(f)
    del f
    gc.collect()
    assert gone() is None  # its answer does not keep it


def test_a_function_that_cannot_be_remembered_is_read_each_time(signatures):
    from apache_beam.transforms import core

    for f in (Slotted(), UnhashableSized()):  # no weak reference; not hashable
        before = signatures[0]
        core.get_function_args_defaults(f)
        core.get_function_args_defaults(f)
        assert signatures[0] == before + 2


def test_the_functions_arguments_installed_once_in_beams_place():
    from apache_beam.transforms import core

    remember_function_args()
    ours = core.get_function_args_defaults
    remember_function_args()
    assert core.get_function_args_defaults is ours and ours.__wrapped__.__module__ == core.__name__
