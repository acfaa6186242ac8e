// What the browser test pages share (served next to them by tests/common/browser.rs):
// the query, the log and the report they POST, waiting, data-channel message exchange,
// joining two RTCPeerConnections, and the selected candidate pair from getStats().
'use strict';
const params = new URLSearchParams(location.search);
const MESSAGES = Number(params.get('messages') || '20');
const t0 = performance.now();
const now = () => Math.round(performance.now() - t0);

// POSTs go out one after the other, so the log arrives in order and before the result.
let posting = Promise.resolve();
function post(path, body) {
  posting = posting.then(() => fetch(path, { method: 'POST', body }).catch(() => {}));
}

function log(line) {
  line = '[' + now() + ' ms] ' + line;
  document.getElementById('out').textContent += line + '\n';
  post('/log', String(line));
}

let reported = false;
function report(result) {
  if (reported) return;
  reported = true;
  log('reporting (ok=' + result.ok + ')');
  post('/result', JSON.stringify(result));
}

window.addEventListener('error', (e) => report({ ok: false, error: 'page error: ' + e.message }));
window.addEventListener('unhandledrejection', (e) => report({ ok: false, error: 'unhandled: ' + e.reason }));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function waitFor(what, ms, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error('timeout waiting for ' + what)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function opened(dc) {
  return dc.readyState === 'open'
    ? Promise.resolve()
    : new Promise((resolve) => dc.addEventListener('open', () => resolve(), { once: true }));
}

// Receives `count` messages on `dc` and returns them in order.
function collect(dc, count) {
  return new Promise((resolve) => {
    const got = [];
    dc.addEventListener('message', (e) => {
      got.push(String(e.data));
      if (got.length === count) resolve(got);
    });
  });
}

// Sends MESSAGES messages each way between the open channels `x` and `y` (named
// `xName` and `yName`; each message is its sender's name and a number) and returns,
// by receiving end, how many arrived and whether they arrived in order.
async function exchange(x, xName, y, yName) {
  const atY = collect(y, MESSAGES);
  const atX = collect(x, MESSAGES);
  for (let i = 0; i < MESSAGES; i++) {
    x.send(xName + ' ' + i);
    y.send(yName + ' ' + i);
  }
  const [gotY, gotX] = await Promise.all([atY, atX]);
  const inOrder = (got, from) =>
    JSON.stringify(got) === JSON.stringify(Array.from({ length: MESSAGES }, (_, i) => from + ' ' + i));
  return {
    [yName]: { received: gotY.length, inOrder: inOrder(gotY, xName) },
    [xName]: { received: gotX.length, inOrder: inOrder(gotX, yName) },
  };
}

// Joins the RTCPeerConnections `a` and `b` of this page: each one's ICE candidates go
// to the other, and `a` offers.
async function join(a, b) {
  const trickle = (to) => (e) => {
    if (e.candidate) to.addIceCandidate(e.candidate).catch((err) => log('addIceCandidate: ' + err));
  };
  a.addEventListener('icecandidate', trickle(b));
  b.addEventListener('icecandidate', trickle(a));
  await a.setLocalDescription(await a.createOffer());
  await b.setRemoteDescription(a.localDescription);
  await b.setLocalDescription(await b.createAnswer());
  await a.setRemoteDescription(b.localDescription);
}

const pickCandidate = (c) => c && {
  candidateType: c.candidateType, address: c.address || c.ip || null, port: c.port,
  protocol: c.protocol, relayProtocol: c.relayProtocol || null, url: c.url || null,
};

// The selected candidate pair of a getStats() report with its local and remote
// candidates, or null.
function selectedPair(stats) {
  const byId = new Map();
  stats.forEach((s) => byId.set(s.id, s));
  let pair = null;
  stats.forEach((s) => {
    if (s.type === 'transport' && s.selectedCandidatePairId) pair = byId.get(s.selectedCandidatePairId);
  });
  if (!pair) {
    stats.forEach((s) => {
      if (s.type === 'candidate-pair' && s.state === 'succeeded' && (s.nominated || s.selected)) pair = s;
    });
  }
  if (!pair) return null;
  return {
    state: pair.state, nominated: !!pair.nominated,
    bytesSent: pair.bytesSent, bytesReceived: pair.bytesReceived,
    currentRoundTripTime: pair.currentRoundTripTime,
    local: pickCandidate(byId.get(pair.localCandidateId)),
    remote: pickCandidate(byId.get(pair.remoteCandidateId)),
  };
}
