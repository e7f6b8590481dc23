"""Replaying a window's events in time order: installs as they come due, each event's
accounting, the device's signals, and the trigger's call.

Events went through the models the devices held beforehand (clients/scoring.py), and are
ranked a few at a time as the walk reaches them; here each device walks its events in order:
a pending model is installed at the first event at or after its install time; the event is
counted; the signals a trigger reads are updated; the trigger decides. A device that sends a
request stops there: it waits for the cloud's answer (the rest of its window is replayed in
the next exchange, once the answer's install time is known).
"""

from __future__ import annotations

import numpy as np

from clients.scoring import Scored
from clients.state import Devices, Fixed
from clients.triggers import DeviceView, Trigger
from fl_sim.devices.budget import budgets, shares


RANK_AHEAD = 16  # events ranked at a time per device: a request wastes at most this many rankings


def install(st: Devices, j: int) -> None:
    model, at = st.pending[j]
    st.held[j], st.arrived[j] = model, at
    st.pending[j] = None
    st.outstanding[j] = False
    st.acc["installs"][j] += 1


def replay(fx: Fixed, st: Devices, trigger: Trigger, active: np.ndarray, lo: np.ndarray, hi: np.ndarray,
           sc: Scored) -> tuple[np.ndarray, np.ndarray]:
    """Walk every active device through its events lo:hi. Returns the devices that sent a
    request and the event (global index) each sent it at; st.pos moves past what was replayed."""
    acc, ema = st.acc, float(fx.cfg.sim.ema)
    budget_terms = shares(fx.cfg.devices)
    counts = (hi - lo)[active]
    going = np.ones(len(active), bool)
    sent_rows, sent_events = [], []
    for k in range(int(counts.max()) if len(counts) else 0):
        sel = np.flatnonzero(going & (counts > k))
        if not len(sel):
            break
        if k % RANK_AHEAD == 0:  # the next events of the devices still going (see Scored.rank)
            n = np.minimum(counts[sel] - k, RANK_AHEAD)
            first = np.repeat(sc.offset[sel] + k - np.cumsum(n) + n, n)
            sc.rank(fx, first + np.arange(int(n.sum())))
        js, out = active[sel], sc.offset[sel] + k
        e = lo[js] + k
        for a in sel[sc.switch[sel] == e]:
            install(st, active[a])
        g = fx.devices[js]
        t = fx.s.ts[e]
        scored, no_model = sc.scored[out], sc.no_model[out]
        acc["events"][js] += 1
        acc["ndcg"][js] += sc.ndcg[out]
        acc["hit"][js] += sc.hit[out]
        acc["scored"][js] += scored
        acc["no_model"][js] += no_model
        acc["no_context"][js] += ~scored & ~no_model
        acc["waiting"][js] += scored & st.outstanding[js]  # ranked while an answer was on its way
        acc["flops"][js] += np.where(scored, sc.flops[out], 0)
        acc["params"][js] += np.where(scored, sc.params[out], 0)
        st.block_events[js] += scored[:, None] & sc.blocks[out]
        new_session = fx.s.session[e] != st.last_session[js]
        st.last_session[js] = fx.s.session[e]
        st.events_since[js] += 1
        st.sessions_since[js] += new_session
        st.interest[js] = (1 - ema) * st.interest[js] + ema * fx.emb[fx.ids[e]]
        # Moving averages of the prediction signals; a plain mean over the first 1/ema events so
        # that a device's first values are not biased towards zero.
        st.signal_n[js] += scored
        w = np.where(scored, np.maximum(ema, 1.0 / np.maximum(st.signal_n[js], 1)), 0.0)
        st.entropy[js] = (1 - w) * st.entropy[js] + w * sc.entropy[out]
        st.hit_rate[js] = (1 - w) * st.hit_rate[js] + w * sc.hit[out]
        max_f, max_p = budgets(fx.fleet, g, t, *budget_terms)
        acc["over_budget_events"][js] += scored & (sc.flops[out] > max_f)
        view = DeviceView(device=g, index=js, now=t, events_since_request=st.events_since[js],
                          sessions_since_request=st.sessions_since[js], new_session=new_session,
                          interest=st.interest[js], interest_at_request=st.interest_at_request[js],
                          entropy=st.entropy[js], hit_rate=st.hit_rate[js],
                          bytes_spent=acc["bytes_up"][js] + acc["bytes_down"][js],
                          link_bps=fx.fleet.down_bps(g, t), max_flops=max_f, max_params=max_p,
                          model_age_s=t - st.arrived[js], days=t / 86_400.0)
        want = np.asarray(trigger.decide(view), dtype=bool) & ~st.outstanding[js]
        online = fx.fleet.online(g, t)
        acc["offline_deferred"][js] += want & ~online
        send = want & online
        trigger.requested(send, view)
        if send.any():
            sj = js[send]
            st.events_since[sj] = 0
            st.sessions_since[sj] = 0
            st.interest_at_request[sj] = st.interest[sj]
            going[sel[send]] = False
            sent_rows.append(sj)
            sent_events.append(e[send])
    rows = np.concatenate(sent_rows) if sent_rows else np.zeros(0, np.int64)
    events = np.concatenate(sent_events) if sent_events else np.zeros(0, np.int64)
    st.pos[active] = hi[active]
    st.pos[rows] = events + 1
    return rows, events
