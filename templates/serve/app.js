// The page of `lightning-sae-samples serve`: a hash router over the JSON API. Plain JS, nothing fetched but
// this server's /api. Token text only ever goes into the DOM as textContent (never as markup).
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var SVG = "http://www.w3.org/2000/svg";
  var PAGE_SIZE = 50;
  var state = {
    run: new URLSearchParams(location.search).get("run"), version: null, summary: null, route: null,
    list: { sort: "max_activation", order: "desc", filter: "all", dense: 0.1, range: null, scoreLow: null, offset: 0,
      history: "", historyStep: 0 },
    examples: 20, searchOffset: 0, explanationsVersion: null, runs: [], timeline: null, window: null, windowSamples: {},
  };
  function meta(name) { var node = document.querySelector('meta[name="' + name + '"]'); return node ? node.content : ""; }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") { node.textContent = attrs[key]; }
      else if (key === "className") { node.className = attrs[key]; }
      else if (key === "style") { node.style.cssText = attrs[key]; }
      else { node.setAttribute(key, attrs[key]); }
    });
    (children || []).forEach(function (child) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } return node; }
  function show(id, on) { $(id).hidden = !on; }

  function api(path, params) {
    var query = new URLSearchParams(params || {});
    if (state.run !== null && !query.has("run")) { query.set("run", state.run); }
    return fetch("/api/" + path + "?" + query.toString(), { headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) { var err = new Error(body.error || response.statusText); err.status = response.status; throw err; }
          return body;
        });
      });
  }
  function post(path, body) {
    var query = new URLSearchParams();
    if (state.run !== null) { query.set("run", state.run); }
    return fetch("/api/" + path + "?" + query.toString(), {
      method: "POST", body: JSON.stringify(body),
      headers: { Accept: "application/json", "Content-Type": "application/json", "X-SAE-Samples-Token": meta("sae-samples-token") },
    }).then(function (response) {
      return response.json().then(function (b) {
        if (!response.ok) { var err = new Error(b.error || response.statusText); err.status = response.status; throw err; }
        return b;
      });
    });
  }
  function problem(err) {
    $("error-banner").textContent = err.message;
    show("error-banner", true);
  }
  function fine() { show("error-banner", false); }
  function explanationsProblem(message) {
    $("explanations-banner").textContent = message ? "Explanations and labels cannot be read: " + message : "";
    show("explanations-banner", Boolean(message));
  }

  // ------------------------------------------------------------------ shared pieces
  function chip(label, extra, title) {
    var node = el("span", { className: "chip" }, [label + " ", el("span", { className: "n", text: extra })]);
    if (title) { node.title = title; }
    return node;
  }
  // Raw token strings as "a", " b" (as the reports' "through training" line writes them).
  function quotedTokens(tokens) { return tokens.map(function (t) { return "\"" + t + "\""; }).join(", "); }
  function tokenChips(cell, tokens) {
    tokens.forEach(function (t) { cell.appendChild(chip(t.label, "×" + t.samples)); });
  }
  function example(e, head) {
    var ctx = el("span", { className: "ctx" });
    e.tokens.forEach(function (t) {
      if (t.gap_before) { ctx.appendChild(document.createTextNode(" ")); }
      var tok = el("span", { className: "tok" + (t.activating ? " act" : "") + (t.punct ? " punct" : ""),
        style: t.style, title: t.title, text: t.shown });
      if (t.activating) {
        ctx.appendChild(el("span", { className: "act-wrap" }, [tok,
          el("span", { className: "val", title: "activation on the activating token", text: t.value })]));
      } else {
        ctx.appendChild(tok);
      }
    });
    var meta = el("span", { className: "meta" }, [el("b", { text: e.value }), " · step " + e.step
      + (e.position === null || e.position === undefined ? "" : " · pos " + e.position)]);
    var item = el("li", {}, head ? [head, meta, " ", ctx] : [meta, " ", ctx]);
    return item;
  }
  function bars(svg, items, width, height, labelSpace, onClick, selected) {
    clear(svg);
    var plot = height - labelSpace;
    svg.appendChild(svgNode("line", { x1: 0, y1: plot, x2: width, y2: plot }));
    items.forEach(function (b, i) {
      var rect = svgNode("rect", { "class": "bar" + (selected === i ? " selected" : ""), x: b.x, y: b.y, width: b.w, height: b.h });
      var title = svgNode("title", {});
      title.textContent = b.title;
      rect.appendChild(title);
      if (onClick) { rect.addEventListener("click", function () { onClick(i); }); rect.setAttribute("data-bin", i); }
      svg.appendChild(rect);
    });
    if (items.length) {
      var low = svgNode("text", { x: 0, y: height - 3 }); low.textContent = items[0].low;
      var high = svgNode("text", { x: width, y: height - 3, "text-anchor": "end" }); high.textContent = items[items.length - 1].high;
      svg.appendChild(low); svg.appendChild(high);
    }
  }
  function svgNode(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }
  function fact(term, value, note) {
    var dd = el("dd", { text: value });
    if (note) { dd.appendChild(document.createTextNode(" ")); dd.appendChild(el("span", { className: "caption", text: note })); }
    return el("div", {}, [el("dt", { text: term }), dd]);
  }
  function fmtScore(x) { return x === null || x === undefined ? "–" : x.toFixed(2); }
  function meaningText(e) {
    if (!e) { return ""; }
    return e.label ? e.label + (e.text ? " · " + e.text : "") : (e.text || "");
  }
  function explanationCells(row) {
    var e = row.explanation;
    var text = el("td", { className: "explanation", text: meaningText(e) });
    if (e && e.stale) { text.appendChild(el("span", { className: "caption stale", text: " (older samples)" })); }
    var score = el("td", { className: "score detection", text: e ? fmtScore(e.score) : "–" });
    if (e && e.random_score !== null && e.random_score !== undefined) { score.title = "random explanation: " + fmtScore(e.random_score); }
    var embedding = el("td", { className: "score embedding", text: e ? fmtScore(e.embedding_score) : "–" });
    if (e && e.embedding_random_score !== null && e.embedding_random_score !== undefined) { embedding.title = "random explanation: " + fmtScore(e.embedding_random_score); }
    return [text, score, embedding];
  }
  function rowCells(row, extra) {
    var link = el("a", { href: "#/feature/" + row.idx, text: String(row.idx) });
    var tokens = el("td", { className: "tokens" });
    tokenChips(tokens, row.top_tokens);
    if (row.top_tokens.length) { tokens.appendChild(el("span", { className: "n", text: "of " + row.top_tokens_over })); }
    var cells = [el("td", {}, [link])].concat(extra || []);
    return { link: link, tokens: tokens, cells: cells, meaning: explanationCells(row) };
  }
  function clickRow(tr, idx) {
    tr.setAttribute("data-feature", idx);
    tr.addEventListener("click", function (ev) { if (ev.target.tagName !== "A") { location.hash = "#/feature/" + idx; } });
  }

  // ------------------------------------------------------------------ summary and frequency histogram
  function renderSummary(s) {
    state.summary = s;
    explanationsProblem(s.explanations_error);
    $("run-path").textContent = s.summary.path;
    $("save-info").textContent = "step " + s.global_step + (s.summary.save_id !== null ? " · save " + s.summary.save_id : "");
    var facts = clear($("facts"));
    facts.appendChild(fact("Global step", String(s.global_step)));
    facts.appendChild(fact("Steps collected", s.steps_collected, "(" + s.first_step + "–" + s.last_step + ")"));
    facts.appendChild(fact("Tokens seen", s.tokens_seen));
    facts.appendChild(fact("Latents tracked", s.latents));
    facts.appendChild(fact("Alive latents", s.alive, "(" + s.alive_share + ")"));
    facts.appendChild(fact("Never fired", s.never_fired));
    facts.appendChild(fact("Top samples kept", s.samples_stored));
    if (!s.summary.has_full_state) { facts.appendChild(fact("Listed", String(s.summary.listed_features), "saved features only (no full_state.pt)")); }
    var edges = s.histogram.log10_edges, counts = s.histogram.counts;
    var top = Math.max.apply(null, counts.concat([1])), step = 480 / Math.max(counts.length, 1), plot = 94;
    var items = counts.map(function (c, i) {
      var h = c ? Math.max(1, c / top * plot) : 0;
      return { x: i * step + 1, y: plot - h, w: Math.max(step - 2, 1), h: h, low: fmtPow(edges[0]), high: fmtPow(edges[edges.length - 1]),
        title: "frequency " + fmtPow(edges[i]) + "–" + fmtPow(edges[i + 1]) + ": " + c + " latents" };
    });
    var selected = null;
    if (state.list.range) { selected = edges.indexOf(state.list.range[0]); }
    bars($("frequency-histogram"), items, 480, 110, 16, function (i) {
      state.list.range = [edges[i], edges[i + 1]];
      state.list.offset = 0;
      if (state.list.filter === "dead") { state.list.filter = "all"; }
      go("#/");
    }, selected);
    show("frequency-chart", counts.length > 0);
    show("history-nav", Boolean(s.has_history));
    show("history-label", Boolean(s.has_history));
    if (!s.has_history) { state.list.history = ""; }
    show("run-summary", true);
    show("controls", true);
  }
  function fmtPow(e) { return Number(Math.pow(10, e).toPrecision(2)).toString(); }

  // ------------------------------------------------------------------ the feature list
  function syncControls() {
    $("sort-select").value = state.list.sort;
    $("order-select").value = state.list.order;
    $("filter-select").value = state.list.filter;
    $("dense-input").value = state.list.dense;
    $("score-input").value = state.list.scoreLow === null ? "" : state.list.scoreLow;
    show("dense-label", state.list.filter === "dense");
    $("history-select").value = state.list.history;
    $("history-step").value = state.list.historyStep;
    show("history-step-label", state.list.history === "born_after");
    ["sort-select", "order-select", "filter-select", "score-input", "dense-input"].forEach(function (id) { $(id).disabled = Boolean(state.list.history); });
    show("range-chip", state.list.range !== null);
    if (state.list.range) { $("range-text").textContent = "frequency " + fmtPow(state.list.range[0]) + "–" + fmtPow(state.list.range[1]); }
  }
  function showList() {
    syncControls();
    var l = state.list, params = { sort: l.sort, order: l.order, filter: l.filter, offset: l.offset, limit: PAGE_SIZE };
    if (l.filter === "dense") { params.dense_above = l.dense; }
    if (l.range) { params.log10_low = l.range[0]; params.log10_high = l.range[1]; }
    if (l.scoreLow !== null) { params.score_low = l.scoreLow; }
    show("feature-table", !l.history);
    show("history-table", Boolean(l.history));
    // Only the latest request fills the list: an older answer arriving later (a quick change of the controls) is dropped.
    var ticket = state.listTicket = (state.listTicket || 0) + 1;
    if (l.history) { return showHistoryList(ticket).then(pageDone); }
    return api("features", params).then(function (page) {
      if (ticket !== state.listTicket) { return; }
      var body = clear($("feature-rows"));
      page.rows.forEach(function (row) {
        var overlap = el("td", { className: "overlap" + (row.drift ? " drift" : ""), text: (row.drift ? "⚠ " : "") + (row.recent_overlap === null ? "–" : row.recent_overlap) });
        var parts = rowCells(row, [el("td", { text: row.max }), el("td", { text: row.mean }), el("td", { text: row.count }),
          el("td", { text: row.frequency }), overlap, el("td", { text: row.first_step === null ? "–" : String(row.first_step) }),
          el("td", { text: row.last_step === null ? "–" : String(row.last_step) })]);
        var tr = el("tr", {}, parts.cells.concat([parts.tokens]).concat(parts.meaning));
        clickRow(tr, row.idx);
        body.appendChild(tr);
      });
      $("list-title").textContent = "Features by " + $("sort-select").selectedOptions[0].textContent;
      pageDone(page);
    });
  }
  // The list's count and pager, for a page of either list (the statistics one or the history one).
  function pageDone(page) {
    if (!page) { return; }
    var l = state.list;
    $("list-count").textContent = page.total.toLocaleString("en-US") + " latents";
    $("page-info").textContent = page.total ? "rows " + (l.offset + 1) + "–" + (l.offset + page.rows.length) + " of " + page.total.toLocaleString("en-US") : "no latent matches";
    $("page-prev").disabled = l.offset === 0;
    $("page-next").disabled = l.offset + page.rows.length >= page.total;
    state.listTotal = page.total;
    showView("list-view");
  }

  // ------------------------------------------------------------------ one feature
  function showFeature(idx) {
    return api("features/" + idx, { examples: state.examples }).then(function (f) {
      $("feature-title").textContent = "Feature " + f.idx;
      $("feature-title").href = "#/feature/" + f.idx;
      $("feature-badge").textContent = f.saved ? "" : "from full_state.pt";
      var drift = f.recent && f.recent.drift;
      $("drift-badge").textContent = drift ? "⚠ meaning may have moved" : "";
      $("drift-badge").title = drift || "";
      show("drift-badge", Boolean(drift));
      var prev = $("prev-feature"), next = $("next-feature");
      prev.href = "#/feature/" + Math.max(0, f.idx - 1); prev.hidden = f.idx === 0;
      next.href = "#/feature/" + Math.min(f.num_features - 1, f.idx + 1); next.hidden = f.idx >= f.num_features - 1;
      var stats = clear($("feature-stats"));
      stats.appendChild(fact("Max", f.max));
      stats.appendChild(fact("Mean ± std", f.mean + " ± " + f.std));
      stats.appendChild(fact("Min", f.min));
      stats.appendChild(fact("Count", f.count));
      stats.appendChild(fact("Frequency", f.frequency));
      stats.appendChild(fact("Samples kept", f.num_samples));
      stats.appendChild(fact("Fired at steps", f.first_step + "–" + f.last_step));
      if (f.recent) { stats.appendChild(fact("Recent overlap", f.recent_overlap)); }
      var items = f.bars.map(function (b) {
        return { x: b.x, y: b.y, w: b.w, h: b.h, low: Number(b.bin.low.toPrecision(3)).toString(),
          high: Number(b.bin.high.toPrecision(3)).toString(), title: "activation " + b.bin.label + ": " + b.bin.count };
      });
      bars($("feature-histogram"), items, 320, 90, 16, null, null);
      show("feature-chart", items.length > 0);
      var logits = clear($("feature-logits"));
      if (f.logit_effects) {
        [["promoted", "Promotes"], ["suppressed", "Suppresses"]].forEach(function (side) {
          var p = el("p", { className: "logit-" + side[0] }, [el("span", { className: "caption", text: side[1] }), " "]);
          f.logit_effects[side[0]].forEach(function (t) { p.appendChild(chip(t.label, t.value, t.title)); });
          logits.appendChild(p);
        });
      }
      show("feature-logits", Boolean(f.logit_effects));
      renderMeaning(f);
      loadNeighbours(f);
      var list = clear($("feature-examples"));
      f.examples.forEach(function (e) { list.appendChild(example(e)); });
      if (!f.examples.length) { list.appendChild(el("li", { className: "caption", text: "No samples: this latent never fired above the threshold." })); }
      $("examples-caption").textContent = f.examples.length + " of " + f.kept_samples + " kept"
        + (f.unknown_note ? " · " + f.unknown_note : "");
      show("more-examples", f.examples.length < f.kept_samples);
      var intervals = clear($("interval-list"));
      f.interval_groups.forEach(function (g) {
        intervals.appendChild(el("h3", {}, [g.label + " ", el("span", { className: "caption", text: g.count + " activations (" + g.share + ")" })]));
        var ol = el("ol", { className: "examples" });
        g.examples.forEach(function (e) { ol.appendChild(example(e)); });
        intervals.appendChild(g.examples.length ? ol : el("p", { className: "caption", text: "No samples kept." }));
      });
      $("intervals-caption").textContent = f.interval_groups.length + " intervals reached";
      show("feature-intervals", f.has_intervals);
      var recent = clear($("recent-examples"));
      if (f.recent) {
        f.recent.examples.forEach(function (e) { recent.appendChild(example(e)); });
        $("recent-caption").textContent = "steps " + f.recent_window + (drift ? " · ⚠ " + drift : " · recent overlap " + f.recent.overlap);
        $("feature-recent").classList.toggle("drifted", Boolean(drift));
        if (drift) { $("feature-recent").open = true; }
      }
      show("feature-recent", Boolean(f.recent));
      syncCompareRuns(f.idx);
      showView("feature-view");
      return showFeatureHistory(f.idx);
    });
  }

  function renderMeaning(f) {
    var e = f.explanation;
    var text = $("feature-explanation");
    clear(text);
    if (e && e.text) {
      text.appendChild(el("b", { text: "Explanation: " }));
      text.appendChild(document.createTextNode(e.text));
    } else {
      text.appendChild(el("span", { className: "caption", text: "No explanation yet (lightning-sae-samples explain DIR)." }));
    }
    var notes = [];
    if (e && e.text) {
      if (e.score !== null && e.score !== undefined) {
        notes.push("detection " + fmtScore(e.score) + (e.score_contexts ? " on " + e.score_contexts + " contexts" : "")
          + (e.random_score !== null && e.random_score !== undefined ? " (random explanation " + fmtScore(e.random_score) + ")" : ""));
      }
      if (e.embedding_score !== null && e.embedding_score !== undefined) {
        notes.push("embedding AUROC " + fmtScore(e.embedding_score) + (e.embedding_contexts ? " on " + e.embedding_contexts + " contexts" : "")
          + (e.embedding_random_score !== null && e.embedding_random_score !== undefined ? " (random explanation " + fmtScore(e.embedding_random_score) + ")" : ""));
      }
      if ((e.score === null || e.score === undefined) && (e.embedding_score === null || e.embedding_score === undefined)) { notes.push("not scored"); }
      if (e.model) { notes.push(e.model); }
      if (e.stale) { notes.push("⚠ written from the samples of step " + e.samples_step + ", older than these (step " + f.global_step + ")"); }
    }
    $("explanation-note").textContent = notes.join(" · ");
    $("explanation-note").classList.toggle("stale", Boolean(e && e.stale));
    $("label-input").value = e && e.label ? e.label : "";
    $("label-status").textContent = e && e.label ? "label saved" : "";
    var writable = meta("sae-samples-writes") === "1";
    $("label-input").disabled = !writable; $("label-save").disabled = !writable;
    if (!writable) { $("label-status").textContent = "read-only server (start it with --allow-writes to save labels)"; }
  }
  function loadNeighbours(f) {
    var list = clear($("neighbour-list"));
    show("feature-neighbours", Boolean(f.has_neighbours));
    if (!f.has_neighbours) { return; }
    api("features/" + f.idx + "/neighbours", { k: 10 }).then(function (r) {
      if (!state.route || state.route.idx !== f.idx) { return; }
      r.neighbours.forEach(function (n) {
        var item = el("li", { "data-feature": n.idx }, [el("a", { href: "#/feature/" + n.idx, text: "Feature " + n.idx }),
          el("span", { className: "caption", text: " cos " + n.cosine.toFixed(3) + " " })]);
        var words = meaningText(n.explanation);
        if (words) { item.appendChild(el("span", { className: "explanation", text: words })); }
        else { tokenChips(item, n.top_tokens); }
        list.appendChild(item);
      });
    }).catch(problem);
  }

  // ------------------------------------------------------------------ search
  function showSearch(mode, query) {
    $("search-mode").value = mode;
    $("search-input").value = query;
    show("token-results", false); show("context-results", false); show("search-empty", false); show("search-pager", false);
    if (mode === "context") {
      return api("search/context", { text: query, offset: state.searchOffset, limit: 20 }).then(function (r) {
        var list = state.searchOffset ? $("context-results") : clear($("context-results"));
        list.setAttribute("start", 1);
        r.hits.forEach(function (e) {
          var head = el("span", { className: "hit-head" }, [el("a", { href: "#/feature/" + e.feature_idx, text: "Feature " + e.feature_idx }),
            el("span", { className: "caption", text: " · sample " + e.rank })]);
          list.appendChild(example(e, head));
        });
        $("search-title").textContent = "Context holding “" + query + "”";
        $("search-count").textContent = list.children.length + (r.more ? "+" : "") + " kept samples";
        show("context-results", list.children.length > 0);
        emptyNote(list.children.length === 0, "No kept sample's context holds this text.");
        show("search-pager", r.more);
        showView("search-view");
      });
    }
    if (mode === "explanation") {
      return api("search/explanation", { text: query, offset: state.searchOffset, limit: PAGE_SIZE }).then(function (r) {
        var body = state.searchOffset ? $("token-rows") : clear($("token-rows"));
        r.rows.forEach(function (row) {
          var parts = rowCells(row, [el("td", { text: row.relevance.toFixed(2), title: "relevance (BM25)" }), el("td", { text: row.max }),
            el("td", { text: row.count }), el("td", { text: row.frequency })]);
          var tr = el("tr", {}, parts.cells.concat([parts.tokens]).concat(parts.meaning));
          clickRow(tr, row.idx);
          body.appendChild(tr);
        });
        $("search-title").textContent = "Explanations matching “" + query + "”";
        $("search-count").textContent = r.total + " latents";
        show("token-results", r.total > 0);
        emptyNote(r.total === 0, "No latent's explanation or label holds these words.");
        show("search-pager", body.children.length < r.total);
        showView("search-view");
      });
    }
    var params = mode === "token-id" ? { id: query } : { text: query };
    params.offset = state.searchOffset; params.limit = PAGE_SIZE;
    return api("search/token", params).then(function (r) {
      var body = state.searchOffset ? $("token-rows") : clear($("token-rows"));
      r.rows.forEach(function (row) {
        var parts = rowCells(row, [el("td", { text: String(row.token_samples) }), el("td", { text: row.max }),
          el("td", { text: row.count }), el("td", { text: row.frequency })]);
        var tr = el("tr", {}, parts.cells.concat([parts.tokens]).concat(parts.meaning));
        clickRow(tr, row.idx);
        body.appendChild(tr);
      });
      var names = r.tokens.map(function (t) { return t.label + " (id " + t.token_id + ")"; }).join(", ");
      $("search-title").textContent = "Latents that fire on " + (mode === "token-id" ? "token id " + query : "“" + query + "”");
      $("search-count").textContent = r.total + " latents" + (names ? " · tokens " + names : "");
      show("token-results", r.total > 0);
      emptyNote(r.total === 0, r.tokens.length ? "No kept top sample has this activating token." : "No kept top sample's activating token reads like this.");
      show("search-pager", body.children.length < r.total);
      showView("search-view");
    });
  }
  function emptyNote(on, text) { $("search-empty").textContent = text; show("search-empty", on); }

  // ------------------------------------------------------------------ the training history (training_history.pt)
  var KIND_NAMES = { birth: "birth", death: "death", revival: "revival", meaning_change: "meaning change" };
  var KIND_MARKS = { birth: "▲", death: "▼", revival: "▲", meaning_change: "◆" };
  var CHART = { width: 640, left: 44, right: 8, top: 6, plot: 68, gap: 22 };
  function fmtNum(x) { return x === null || x === undefined ? "–" : Number(x.toPrecision(3)).toString(); }
  function stepsText(w) { return w[0] + "–" + w[1]; }
  function stepScale(steps) {
    var low = steps.length ? steps[0][0] : 0, high = steps.length ? steps[steps.length - 1][1] : 1;
    var span = Math.max(high - low, 1), inner = CHART.width - CHART.left - CHART.right;
    return function (step) { return CHART.left + (step - low) / span * inner; };
  }
  function svgText(svg, x, y, text, anchor, cls) {
    var node = svgNode("text", { x: x, y: y, "text-anchor": anchor || "start" });
    if (cls) { node.setAttribute("class", cls); }
    node.textContent = text;
    svg.appendChild(node);
    return node;
  }
  function titled(node, text) { var t = svgNode("title", {}); t.textContent = text; node.appendChild(t); return node; }
  function axes(svg, steps, rows) {
    var x = stepScale(steps), bottom = CHART.top + rows * CHART.plot + (rows - 1) * CHART.gap;
    svg.appendChild(svgNode("line", { "class": "axis", x1: CHART.left, y1: bottom, x2: CHART.width - CHART.right, y2: bottom }));
    if (steps.length) {
      svgText(svg, x(steps[0][0]), bottom + 12, "step " + steps[0][0], "start");
      svgText(svg, x(steps[steps.length - 1][1]), bottom + 12, String(steps[steps.length - 1][1]), "end");
    }
    return { x: x, bottom: bottom };
  }
  // One chart row: its label, its top value and the y of a value.
  function chartRow(svg, row, label, top) {
    var y0 = CHART.top + row * (CHART.plot + CHART.gap);
    svgText(svg, 0, y0 + 10, label, "start", "row-label");
    svgText(svg, CHART.left - 4, y0 + 22, fmtNum(top), "end");
    svg.appendChild(svgNode("line", { "class": "axis", x1: CHART.left, y1: y0 + CHART.plot, x2: CHART.width - CHART.right, y2: y0 + CHART.plot }));
    return function (value) { return y0 + CHART.plot - (top > 0 ? value / top * CHART.plot : 0); };
  }

  function showFeatureHistory(idx) {
    show("feature-history", false);
    if (!state.summary || !state.summary.has_history) { return Promise.resolve(); }
    return api("history/features/" + idx).then(function (t) {
      if (!state.route || state.route.idx !== idx) { return; }
      state.timeline = t;
      drawTimeline(t);
      var fired = t.windows.length;
      $("timeline-caption").textContent = "fired in " + fired + " of " + t.steps.length + " windows · "
        + (t.events.length ? t.events.map(function (e) { return KIND_NAMES[e.kind] + " at step " + e.step; }).join(" · ") : "no events");
      var body = clear($("timeline-rows"));
      var byIndex = windowsByIndex(t);
      t.steps.forEach(function (w, i) {
        var found = byIndex[i];
        var tokens = el("td", { className: "tokens" });
        if (found) { found.top_tokens.forEach(function (tok) { tokens.appendChild(chip(tok.label, "×" + tok.count)); }); }
        else { tokens.appendChild(el("span", { className: "caption", text: "silent" })); }
        if (found && (found.rare || !found.tested)) {
          tokens.appendChild(el("span", { className: "caption", text: found.rare ? " rare" : " too few to compare" }));
        }
        var tr = el("tr", { "data-window": i }, [el("td", { text: String(i) }), el("td", { text: stepsText(w) }),
          el("td", { text: found ? String(found.count) : "0" }), el("td", { text: found ? found.shown.frequency : "0" }),
          el("td", { text: found ? found.shown.max : "–" }), el("td", { text: found ? found.shown.mean : "–" }), tokens]);
        tr.addEventListener("click", function () { selectWindow(i); });
        body.appendChild(tr);
      });
      [$("compare-window-a"), $("compare-window-b")].forEach(function (select) {
        clear(select);
        t.steps.forEach(function (w, i) {
          select.appendChild(el("option", { value: i, text: "window " + i + " (steps " + stepsText(w) + ")" + (byIndex[i] ? "" : " silent") }));
        });
      });
      var active = t.windows.map(function (w) { return w.index; });
      $("compare-window-a").value = active.length ? active[0] : 0;
      $("compare-window-b").value = active.length ? active[active.length - 1] : Math.max(t.steps.length - 1, 0);
      selectWindow(active.length ? active[active.length - 1] : 0);
      $("timeline-caption").setAttribute("data-latent", idx);
      show("feature-history", t.steps.length > 0);
    });
  }
  function windowsByIndex(t) {
    var out = {};
    t.windows.forEach(function (w) { out[w.index] = w; });
    return out;
  }
  function drawTimeline(t) {
    var svg = clear($("timeline-chart")), byIndex = windowsByIndex(t);
    var topFreq = Math.max.apply(null, t.windows.map(function (w) { return w.frequency; }).concat([0]));
    var topMax = Math.max.apply(null, t.windows.map(function (w) { return w.max; }).concat([0]));
    var ax = axes(svg, t.steps, 2), x = ax.x;
    var yFreq = chartRow(svg, 0, "freq", topFreq), yMax = chartRow(svg, 1, "max", topMax);
    var points = t.steps.map(function (w, i) {
      return [(x(w[0]) + x(w[1])) / 2, yFreq(byIndex[i] ? byIndex[i].frequency : 0)];
    });
    t.steps.forEach(function (w, i) {
      var found = byIndex[i];
      var g = svgNode("g", { "class": "window" + (found ? "" : " silent"), "data-window": i });
      var left = x(w[0]), right = x(w[1]), width = Math.max(right - left - 2, 1);
      g.appendChild(svgNode("rect", { "class": "hit", x: left, y: CHART.top, width: Math.max(right - left, 1), height: ax.bottom - CHART.top }));
      var barTop = found ? yMax(found.max) : yMax(0);
      g.appendChild(svgNode("rect", { "class": "bar", x: left + 1, y: barTop, width: width, height: yMax(0) - barTop }));
      g.appendChild(svgNode("circle", { "class": "point", cx: points[i][0], cy: points[i][1], r: 3 }));
      titled(g, "window " + i + " · steps " + stepsText(w) + (found ? " · count " + found.count + " · frequency " + found.shown.frequency
        + " · max " + found.shown.max + " · top " + found.top_tokens.map(function (tok) { return tok.label; }).join(" ") : " · silent"));
      g.addEventListener("mouseenter", function () { selectWindow(i); });
      g.addEventListener("click", function () { selectWindow(i); });
      svg.appendChild(g);
    });
    svg.appendChild(svgNode("polyline", { "class": "freq-line", points: points.map(function (p) { return p.join(","); }).join(" ") }));
    var seen = {};
    t.events.forEach(function (e) {
      var at = x(e.step), stack = seen[e.step] = (seen[e.step] || 0) + 1;
      var g = svgNode("g", { "class": "event event-" + e.kind, "data-kind": e.kind, "data-step": e.step, "data-window": e.window });
      g.appendChild(svgNode("line", { x1: at, y1: CHART.top, x2: at, y2: ax.bottom }));
      svgText(g, at, CHART.top + 2 + 10 * stack, KIND_MARKS[e.kind], "middle", "mark");
      var words = KIND_NAMES[e.kind] + " at step " + e.step;
      if (e.kind === "meaning_change") {
        words += ": " + quotedTokens(e.before) + " → " + quotedTokens(e.after) + " (" + Math.round(e.shift * 100)
          + "% of activations moved, p " + fmtNum(e.p_value) + ", against window " + e.before_window + ")";
      }
      else if (e.after.length) { words += ": " + quotedTokens(e.after); }
      titled(g, words);
      svg.appendChild(g);
    });
  }
  function windowSide(container, t, i, heading) {
    var w = t.steps[i], found = windowsByIndex(t)[i];
    container.appendChild(el("h4", { text: heading || "Window " + i + " · steps " + stepsText(w) }));
    var stats = el("dl", { className: "stats" });
    stats.appendChild(fact("Count", found ? String(found.count) : "0"));
    stats.appendChild(fact("Frequency", found ? found.shown.frequency : "0"));
    stats.appendChild(fact("Max", found ? found.shown.max : "–"));
    stats.appendChild(fact("Mean", found ? found.shown.mean : "–"));
    container.appendChild(stats);
    container.appendChild(windowTokens(el("p", { className: "window-tokens" }), found, "silent in this window"));
    return windowSamples(t.latent, i, found).then(function (samples) {
      var list = el("ol", { className: "examples" });
      samples.forEach(function (e) { list.appendChild(example(e)); });
      container.appendChild(samples.length ? list : el("p", { className: "caption empty", text: "no samples kept for this window" }));
    });
  }
  // A window's top tokens as chips into `node`, or `silent` where the latent did not fire in it.
  function windowTokens(node, found, silent) {
    node.appendChild(el("span", { className: "caption", text: "Top tokens " }));
    if (found && found.top_tokens.length) {
      found.top_tokens.forEach(function (tok) { node.appendChild(chip(tok.label, "×" + tok.count, "token id " + tok.token_id)); });
    } else {
      node.appendChild(el("span", { className: "caption", text: silent }));
    }
    return node;
  }
  // A window's kept samples come in an answer of their own (the timeline only counts them), kept per save.
  function windowSamples(idx, i, found) {
    if (!found || !found.kept_samples) { return Promise.resolve([]); }
    var key = [state.run, state.version, idx, i].join("\u0000");
    if (state.windowSamples[key]) { return Promise.resolve(state.windowSamples[key]); }
    return api("history/features/" + idx + "/windows/" + i).then(function (r) {
      state.windowSamples[key] = r.samples;
      return r.samples;
    });
  }
  function selectWindow(i) {
    var t = state.timeline;
    if (!t || !t.steps[i]) { return; }
    state.window = i;
    Array.prototype.forEach.call(document.querySelectorAll("#timeline-chart g.window, #timeline-rows tr"), function (node) {
      node.classList.toggle("selected", Number(node.getAttribute("data-window")) === i);
    });
    var found = windowsByIndex(t)[i];
    $("window-title").textContent = "Window " + i + " · steps " + stepsText(t.steps[i]) + (found ? " · count " + found.count + " · max " + found.shown.max : " · silent");
    windowTokens(clear($("window-tokens")), found, "it did not fire in this window");
    var list = clear($("window-samples")), detail = $("window-detail");
    detail.removeAttribute("data-shown");
    show("window-empty", false);
    return windowSamples(t.latent, i, found).then(function (samples) {
      if (state.window !== i || state.timeline !== t) { return; }  // another window was picked meanwhile
      samples.forEach(function (e) { list.appendChild(example(e)); });
      $("window-empty").textContent = "no samples kept for this window";
      show("window-empty", samples.length === 0);
      detail.setAttribute("data-shown", i);
    }).catch(problem);
  }

  function showHistoryList(ticket) {
    var l = state.list, params = { filter: l.history, sort: "changes", offset: l.offset, limit: PAGE_SIZE };
    if (l.history === "most_changes") { params.filter = "all"; }
    if (l.history === "born_after") { params.step = l.historyStep; params.sort = "birth"; }
    return api("history/latents", params).then(function (page) {
      if (ticket !== state.listTicket) { return null; }
      var body = clear($("history-rows"));
      page.rows.forEach(function (row) {
        var tr = el("tr", {}, [el("td", {}, [el("a", { href: "#/feature/" + row.latent, text: String(row.latent) })]),
          el("td", { text: String(row.birth) }), el("td", { text: String(row.changes) }), el("td", { text: String(row.deaths) }),
          el("td", { text: String(row.revivals) })]);
        clickRow(tr, row.latent);
        body.appendChild(tr);
      });
      $("list-title").textContent = "Latents: " + $("history-select").selectedOptions[0].textContent + (l.history === "born_after" ? " " + l.historyStep : "");
      return page;
    });
  }

  function showRunHistory() {
    if (!state.summary || !state.summary.has_history) {
      return Promise.reject(new Error("This run has no training history (training_history.pt): it is written by training saves, not by snapshots."));
    }
    return api("history/run").then(function (r) {
      var svg = clear($("run-chart")), steps = r.windows.map(function (w) { return [w.start, w.end]; });
      var topAlive = Math.max.apply(null, r.windows.map(function (w) { return w.alive; }).concat([0]));
      var topEvents = Math.max.apply(null, r.windows.map(function (w) { return Math.max(w.births, w.deaths); }).concat([0]));
      var ax = axes(svg, steps, 2), x = ax.x;
      var yAlive = chartRow(svg, 0, "alive", topAlive);
      var y1 = CHART.top + CHART.plot + CHART.gap, middle = y1 + CHART.plot / 2;
      svgText(svg, 0, y1 + 10, "births", "start", "row-label");
      svgText(svg, 0, y1 + CHART.plot, "deaths", "start", "row-label");
      svgText(svg, CHART.left - 4, y1 + 22, fmtNum(topEvents), "end");
      svg.appendChild(svgNode("line", { "class": "axis", x1: CHART.left, y1: middle, x2: CHART.width - CHART.right, y2: middle }));
      var half = CHART.plot / 2, scale = function (v) { return topEvents > 0 ? v / topEvents * half : 0; };
      var body = clear($("run-rows"));
      r.windows.forEach(function (w, i) {
        var left = x(w.start), width = Math.max(x(w.end) - left - 2, 1);
        var g = svgNode("g", { "class": "run-window", "data-window": i });
        g.appendChild(svgNode("rect", { "class": "bar alive", x: left + 1, y: yAlive(w.alive), width: width, height: yAlive(0) - yAlive(w.alive) }));
        g.appendChild(svgNode("rect", { "class": "bar births", x: left + 1, y: middle - scale(w.births), width: width, height: scale(w.births) }));
        g.appendChild(svgNode("rect", { "class": "bar deaths", x: left + 1, y: middle, width: width, height: scale(w.deaths) }));
        titled(g, "window " + i + " · steps " + w.start + "–" + w.end + " · alive " + w.alive + " · births " + w.births
          + " · deaths " + w.deaths + " · revivals " + w.revivals + " · meaning changes " + w.meaning_changes
          + " · rare " + w.rare);
        svg.appendChild(g);
        body.appendChild(el("tr", { "data-window": i }, [el("td", { text: String(i) }), el("td", { text: w.start + "–" + w.end }),
          el("td", { text: String(w.alive) }), el("td", { text: String(w.rare) }), el("td", { text: String(w.births) }),
          el("td", { text: String(w.deaths) }),
          el("td", { text: String(w.revivals) }), el("td", { text: String(w.meaning_changes) })]));
      });
      $("run-chart-caption").textContent = r.windows.length + " windows · a latent is dead after " + r.dead_window_steps + " silent steps";
      showView("history-view");
    });
  }

  // ------------------------------------------------------------------ side by side
  function showCompare(route) {
    $("compare-back").href = "#/feature/" + route.idx;
    var a = clear($("compare-a")), b = clear($("compare-b"));
    if (route.by === "windows") {
      return api("history/features/" + route.idx).then(function (t) {
        [route.a, route.b].forEach(function (i) {
          if (!t.steps[i]) { throw new Error("The history has windows 0 to " + (t.steps.length - 1) + "; there is no window " + i + "."); }
        });
        $("compare-title").textContent = "Feature " + route.idx + ": window " + route.a + " and window " + route.b;
        return Promise.all([windowSide(a, t, route.a), windowSide(b, t, route.b)]).then(function () { showView("compare-view"); });
      });
    }
    $("compare-title").textContent = "Feature " + route.idx + " in " + route.a + " and " + route.b;
    return Promise.all([route.a, route.b].map(function (run) {
      return api("features/" + route.idx, { run: run, examples: 10 }).then(function (f) { return f; }, function (err) { return err; });
    })).then(function (found) {
      [[a, route.a, found[0]], [b, route.b, found[1]]].forEach(function (side) { runSide(side[0], side[1], side[2]); });
      showView("compare-view");
    });
  }
  function runSide(container, run, f) {
    container.setAttribute("data-run", run);
    if (f instanceof Error) {
      container.appendChild(el("h4", { text: run }));
      container.appendChild(el("p", { className: "caption", text: f.message }));
      return;
    }
    container.appendChild(el("h4", { text: run + " · step " + f.global_step }));
    var stats = el("dl", { className: "stats" });
    stats.appendChild(fact("Max", f.max));
    stats.appendChild(fact("Mean", f.mean));
    stats.appendChild(fact("Count", f.count));
    stats.appendChild(fact("Frequency", f.frequency));
    stats.appendChild(fact("Samples kept", f.num_samples));
    container.appendChild(stats);
    var tokens = el("p", { className: "window-tokens" }, [el("span", { className: "caption", text: "Fires most on " })]);
    tokenChips(tokens, f.top_tokens);
    container.appendChild(tokens);
    var list = el("ol", { className: "examples" });
    f.examples.forEach(function (e) { list.appendChild(example(e)); });
    container.appendChild(list.children.length ? list : el("p", { className: "caption empty", text: "No samples: this latent never fired above the threshold here." }));
  }
  function syncCompareRuns(idx) {
    var runs = state.runs || [];
    show("compare-runs-form", runs.length > 1);
    if (runs.length < 2) { return; }
    [$("compare-run-a"), $("compare-run-b")].forEach(function (select) {
      if (select.options.length !== runs.length) {
        clear(select);
        runs.forEach(function (name) { select.appendChild(el("option", { value: name, text: name })); });
      }
    });
    var other = runs.filter(function (name) { return name !== state.run; });
    $("compare-run-a").value = state.run;
    $("compare-run-b").value = other[0];
    state.compareIdx = idx;
  }

  // ------------------------------------------------------------------ routing and the live save
  var VIEWS = { list: "list-view", search: "search-view", feature: "feature-view", history: "history-view", compare: "compare-view",
    across: "across-view" };
  function showView(id) {
    if (state.route && VIEWS[state.route.kind] !== id) { return; }  // a slower answer for a page already left
    Object.keys(VIEWS).forEach(function (k) { show(VIEWS[k], VIEWS[k] === id); });
  }
  function parseRoute() {
    var hash = location.hash.replace(/^#\/?/, "");
    var m = /^feature\/(\d+)$/.exec(hash);
    if (m) { return { kind: "feature", idx: Number(m[1]) }; }
    if (hash === "history") { return { kind: "history" }; }
    m = /^compare\/(\d+)\/windows\/(\d+)\/(\d+)$/.exec(hash);
    if (m) { return { kind: "compare", by: "windows", idx: Number(m[1]), a: Number(m[2]), b: Number(m[3]) }; }
    m = /^compare\/(\d+)\/runs\/([^/]+)\/([^/]+)$/.exec(hash);
    if (m) { return { kind: "compare", by: "runs", idx: Number(m[1]), a: decodeURIComponent(m[2]), b: decodeURIComponent(m[3]) }; }
    m = /^across\/(token|context)\/(.*)$/.exec(hash);
    if (m) { return { kind: "across", mode: m[1], query: decodeURIComponent(m[2]) }; }
    m = /^(token|token-id|context|explanation)\/(.*)$/.exec(hash);
    if (m) { return { kind: "search", mode: m[1], query: decodeURIComponent(m[2]) }; }
    return { kind: "list" };
  }
  function render() {
    var route = parseRoute();
    var same = state.route && JSON.stringify(state.route) === JSON.stringify(route);
    if (!same) { state.searchOffset = 0; if (route.kind === "feature" && (!state.route || state.route.idx !== route.idx)) { state.examples = 20; } }
    state.route = route;
    var done = route.kind === "feature" ? showFeature(route.idx)
      : route.kind === "search" ? showSearch(route.mode, route.query)
      : route.kind === "history" ? showRunHistory()
      : route.kind === "compare" ? showCompare(route)
      : route.kind === "across" ? showAcross(route.mode, route.query) : showList();
    return done.then(function () {
      fine();
      if (!same && route.kind === "feature") { $("feature-view").scrollIntoView({ block: "start" }); }
    }, problem);
  }
  function go(hash) { if (location.hash === hash) { render(); } else { location.hash = hash; } }
  function loadRun() {
    return api("summary").then(function (s) {
      state.version = s.version;
      state.explanationsVersion = s.explanations_version;
      renderSummary(s);
      return render();
    }, function (err) {
      state.version = null;
      problem(err);
    });
  }
  function poll() {
    api("status").then(function (s) {
      if (s.state === "ready") { explanationsProblem(s.explanations_error); }
      if (s.runs !== undefined && state.runs && s.runs !== state.runs.length) { listRuns(); }
      if (s.state === "ready" && s.version === state.version && state.explanationsVersion !== null
          && s.explanations_version !== state.explanationsVersion) {
        state.explanationsVersion = s.explanations_version;
        render();
      } else if (s.state === "ready" && s.version !== state.version) {
        var first = state.version === null;
        if (!first) {
          $("live-banner").textContent = "New save at step " + s.global_step + (s.save_id !== null ? " (save " + s.save_id + ")" : "") + ": the page shows it.";
          show("live-banner", true);
        }
        loadRun();
      } else if (s.state !== "ready" && s.message) {
        problem(new Error(s.message));
      }
    }).catch(function (err) {
      // A run this page showed is gone from the list (a run folder's SAEs replace it once its index is written).
      if (err.status === 404) { return listRuns().then(loadRun); }
      /* the server is restarting or gone; the next poll tries again */
    })
      .then(function () { setTimeout(poll, 1500); });
  }

  function bind() {
    $("search-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var mode = $("search-mode").value, query = $("search-input").value;
      if ($("search-across").checked && !$("across-label").hidden && (mode === "token" || mode === "context")) {
        if (query.trim() !== "") { go("#/across/" + mode + "/" + encodeURIComponent(query)); }
      } else if (mode === "feature") {
        var n = query.trim().replace(/^#/, "");
        if (!/^\d+$/.test(n)) { problem(new Error("A feature is a number, e.g. 42.")); return; }
        go("#/feature/" + Number(n));
      } else if (query.trim() !== "" || mode === "token") {
        go("#/" + mode + "/" + encodeURIComponent(query));
      }
    });
    function relist() { state.list.offset = 0; go("#/"); }
    $("sort-select").addEventListener("change", function () { state.list.sort = this.value; relist(); });
    $("order-select").addEventListener("change", function () { state.list.order = this.value; relist(); });
    $("filter-select").addEventListener("change", function () { state.list.filter = this.value; relist(); });
    $("dense-input").addEventListener("change", function () { state.list.dense = Number(this.value) || 0; relist(); });
    $("score-input").addEventListener("change", function () { state.list.scoreLow = this.value === "" ? null : Number(this.value); relist(); });
    $("history-select").addEventListener("change", function () { state.list.history = this.value; relist(); });
    $("history-step").addEventListener("change", function () { state.list.historyStep = Math.max(0, Math.floor(Number(this.value) || 0)); relist(); });
    $("compare-windows-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      go("#/compare/" + state.route.idx + "/windows/" + $("compare-window-a").value + "/" + $("compare-window-b").value);
    });
    $("compare-runs-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      go("#/compare/" + state.route.idx + "/runs/" + encodeURIComponent($("compare-run-a").value) + "/" + encodeURIComponent($("compare-run-b").value));
    });
    $("label-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var idx = state.route && state.route.idx;
      $("label-status").textContent = "saving…";
      post("features/" + idx + "/label", { text: $("label-input").value }).then(function (r) {
        $("label-status").textContent = r.explanation && r.explanation.label ? "label saved" : "label cleared";
      }, function (err) { $("label-status").textContent = ""; problem(err); });
    });
    $("range-clear").addEventListener("click", function () { state.list.range = null; relist(); if (state.summary) { renderSummary(state.summary); } });
    $("page-prev").addEventListener("click", function () { state.list.offset = Math.max(0, state.list.offset - PAGE_SIZE); showList().then(fine, problem); });
    $("page-next").addEventListener("click", function () { state.list.offset += PAGE_SIZE; showList().then(fine, problem); });
    $("more-examples").addEventListener("click", function () { state.examples *= 5; render(); });
    $("search-more").addEventListener("click", function () {
      state.searchOffset = state.route.mode === "context" ? $("context-results").children.length : $("token-rows").children.length;
      showSearch(state.route.mode, state.route.query).then(fine, problem);
    });
    // Another SAE (or run) keeps the page as it is: the same route (feature, list, search) and list settings;
    // its name goes into the address (?run=NAME) so that a reload, a link or Back shows the same page.
    $("run-select").addEventListener("change", function () { switchRun(this.value, location.hash); });
    window.addEventListener("hashchange", render);
    window.addEventListener("popstate", function () {
      var wanted = new URLSearchParams(location.search).get("run");
      if (wanted !== null && wanted !== state.run && state.runs.indexOf(wanted) >= 0) {
        state.run = wanted; $("run-select").value = wanted; state.version = null; loadRun();
      }
    });
  }

  function switchRun(name, hash) {
    if (name === state.run) { go(hash || "#/"); return; }
    state.run = name;
    $("run-select").value = name;
    state.version = null;
    state.list.offset = 0;
    history.pushState(null, "", "?run=" + encodeURIComponent(name) + (hash || "#/"));
    loadRun();
  }

  // ------------------------------------------------------------------ search across SAEs
  function showAcross(mode, query) {
    $("search-mode").value = mode;
    $("search-input").value = query;
    $("search-across").checked = true;
    return api("search/saes", { mode: mode, text: query, limit: 20 }).then(function (r) {
      var body = clear($("across-rows")), found = 0, saes = 0;
      var cols = 8;
      r.saes.forEach(function (s) {
        if (s.error) {
          body.appendChild(el("tr", { className: "sae-note", "data-sae": s.sae }, [el("td", { text: s.sae }), el("td", { colspan: cols - 1, text: s.error })]));
          return;
        }
        if (s.rows.length) { saes += 1; }
        found += s.total;
        s.rows.forEach(function (row) {
          var link = el("a", { href: "?run=" + encodeURIComponent(s.sae) + "#/feature/" + row.idx, text: String(row.idx) });
          link.addEventListener("click", function (ev) { ev.preventDefault(); switchRun(s.sae, "#/feature/" + row.idx); });
          var tokens = el("td", { className: "tokens" });
          tokenChips(tokens, row.top_tokens);
          var sample = el("td", { className: "example" });
          if (row.example) { sample.appendChild(el("ol", { className: "examples" }, [example(row.example)])); }
          var tr = el("tr", { "data-sae": s.sae, "data-feature": row.idx }, [el("td", { className: "sae", text: s.sae }), el("td", {}, [link]),
            el("td", { text: String(mode === "token" ? row.token_samples : row.context_samples) }), el("td", { text: row.max }),
            el("td", { text: row.frequency }), tokens, sample, explanationCells(row)[0]]);
          body.appendChild(tr);
        });
        if (s.total > s.rows.length) {
          body.appendChild(el("tr", { className: "sae-note" }, [el("td", { text: s.sae }),
            el("td", { colspan: cols - 1, text: (s.total - s.rows.length) + " more latents of " + s.sae + (s.capped ? " (and maybe more)" : "") })]));
        }
      });
      show("across-example-head", mode === "context");
      Array.prototype.forEach.call(body.querySelectorAll("td.example"), function (td) { td.hidden = mode !== "context"; });
      $("across-title").textContent = (mode === "token" ? "Activating token “" : "Context holding “") + query + "” in every SAE";
      $("across-count").textContent = found + " latents in " + saes + " of " + r.saes.length + " SAEs";
      show("across-empty", found === 0);
      $("across-empty").textContent = found === 0 ? "No SAE has a latent with this among its kept top samples." : "";
      showView("across-view");
    });
  }

  // The run list (and the run select); snapshots written while the page is open join it.
  function listRuns() {
    return fetch("/api/runs").then(function (r) { return r.json(); }).then(function (r) {
      var select = clear($("run-select"));
      r.runs.forEach(function (run) { select.appendChild(el("option", { value: run.name, text: run.name })); });
      state.runs = r.runs.map(function (run) { return run.name; });
      if (state.run === null || state.runs.indexOf(state.run) < 0) { state.run = r.runs.length ? r.runs[0].name : null; }
      select.value = state.run;
      show("run-pick", r.runs.length > 1);
      $("run-pick-label").textContent = r.saes.length ? "SAE" : "Run";
      $("run-select").setAttribute("aria-label", r.saes.length ? "SAE" : "Run");
      show("across-label", r.searchable.length > 1);
      if (state.route && state.route.kind === "feature") { syncCompareRuns(state.route.idx); }
    });
  }

  function start() {
    bind();
    listRuns().then(loadRun).then(poll, problem);
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
