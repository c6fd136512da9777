// The candlestick chart (TradingView Lightweight Charts, vendored under static/vendor).

import { chartPrice, decimalsOf, isoToSeconds } from "./format.js";

// How each kind of horizontal line is drawn: a CSS colour (with its fallback) and Lightweight
// Charts' LineStyle (0 solid, 1 dotted, 2 dashed, 3 large dashed).
const LINE_STYLES = {
  entry: { color: "--accent", fallback: "#4c8dff", lineStyle: 0 },
  liquidation: { color: "--down", fallback: "#ef5350", lineStyle: 2 },
  takeProfit: { color: "--up", fallback: "#26a69a", lineStyle: 3 },
  stopLoss: { color: "--down", fallback: "#ef5350", lineStyle: 3 },
  order: { color: "--accent", fallback: "#4c8dff", lineStyle: 1 },
};

// Room right of the newest candle, in pixels: at least this (six candles at the start's
// spacing), and more when a line's label, which the chart draws over the candles at the pane's
// right edge, is wider: the newest candle stays in view beside the labels.
const MIN_RIGHT_OFFSET_PX = 48;
const LABEL_ROOM_PX = 24; // the label's own padding and a gap before it
const BAR_SPACING_PX = 8; // a candle's width with its gap, until the trader zooms
// Older candles are asked for while the view comes within this many candles of the oldest drawn.
const OLDER_MARGIN_BARS = 20;

function toBar(kline) {
  if (!kline || typeof kline !== "object") return null;
  const time = isoToSeconds(kline.start);
  const bar = {
    time,
    open: Number(kline.open),
    high: Number(kline.high),
    low: Number(kline.low),
    close: Number(kline.close),
  };
  if (time === null) return null;
  if (![bar.open, bar.high, bar.low, bar.close].every(Number.isFinite)) return null;
  return bar;
}

// The price range the chart scales to: the visible candles', widened to take in each level
// (a line) lying within twice their height of them. A level farther off (the liquidation of
// a 2x position, half the price away) would flatten the candles into a line; it stays off the
// chart until the price comes near.
export function withLevels(autoscale, levels) {
  const range = autoscale && autoscale.priceRange;
  if (!range) return autoscale;
  const reach = 2 * (range.maxValue - range.minValue);
  let { minValue, maxValue } = range;
  for (const line of levels) {
    const price = line.options().price;
    if (price < minValue && range.minValue - price <= reach) minValue = price;
    if (price > maxValue && price - range.maxValue <= reach) maxValue = price;
  }
  return { ...autoscale, priceRange: { minValue, maxValue } };
}

export function createCandleChart(container) {
  const LC = window.LightweightCharts;
  if (!LC || typeof LC.createChart !== "function") {
    const note = document.createElement("p");
    note.className = "chart-missing";
    note.textContent = "The chart library did not load.";
    container.append(note);
    return null;
  }
  const style = getComputedStyle(document.documentElement);
  const color = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
  const up = color("--up", "#26a69a");
  const down = color("--down", "#ef5350");
  const chart = LC.createChart(container, {
    autoSize: true,
    layout: {
      background: { type: "solid", color: color("--panel-2", "#182036") },
      textColor: color("--text", "#d6dcea"),
      attributionLogo: true,
    },
    grid: {
      vertLines: { color: color("--line", "#242e48") },
      horzLines: { color: color("--line", "#242e48") },
    },
    rightPriceScale: { borderColor: color("--line", "#242e48") },
    // a vertical swipe over the chart scrolls the page (on a phone the chart is most of the
    // first screen); a horizontal one still pans the candles
    handleScroll: { vertTouchDrag: false },
    // room right of the newest candle, as trading charts keep it: the candle being built
    // (and its time label) stays clear of the price axis and of the lines' labels
    timeScale: {
      borderColor: color("--line", "#242e48"),
      timeVisible: true,
      secondsVisible: false,
      rightOffsetPixels: MIN_RIGHT_OFFSET_PX,
      rightOffset: MIN_RIGHT_OFFSET_PX / BAR_SPACING_PX, // (the library's scrollToRealTime's)
      barSpacing: BAR_SPACING_PX,
    },
  });
  const series = chart.addSeries(LC.CandlestickSeries, {
    upColor: up,
    downColor: down,
    borderUpColor: up,
    borderDownColor: down,
    wickUpColor: up,
    wickDownColor: down,
    autoscaleInfoProvider: (candles) => withLevels(candles(), lines),
  });
  let lastTime = null;
  let lines = [];
  let rightOffsetPx = MIN_RIGHT_OFFSET_PX;
  const measure = document.createElement("canvas").getContext("2d");
  // The newest candle in view, ``rightOffsetPx`` left of the right edge at the spacing of the
  // moment (the library's scrollToRealTime goes by the offset in candles alone).
  const toNewest = () => {
    const timeScale = chart.timeScale();
    timeScale.scrollToPosition(rightOffsetPx / timeScale.options().barSpacing, false);
  };
  // The room the labels of ``titles`` need right of the newest candle. Changing it moves the
  // view to the newest candle, so a trader reading older candles is left where they were.
  const makeRoomFor = (titles) => {
    const { fontSize, fontFamily } = chart.options().layout;
    measure.font = `${fontSize}px ${fontFamily}`;
    const widest = Math.max(0, ...titles.map((title) => measure.measureText(title).width));
    const wanted = Math.max(MIN_RIGHT_OFFSET_PX, Math.ceil(widest) + LABEL_ROOM_PX);
    if (wanted === rightOffsetPx) return;
    rightOffsetPx = wanted;
    const timeScale = chart.timeScale();
    const away = timeScale.scrollPosition() < 0; // the newest candle out of view, right
    const range = timeScale.getVisibleLogicalRange();
    timeScale.applyOptions({
      rightOffsetPixels: wanted,
      rightOffset: wanted / timeScale.options().barSpacing,
    });
    if (away && range) timeScale.setVisibleLogicalRange(range);
  };
  // The levels the scale leaves out, named at the chart's top (above it) and bottom edge
  // (below it): a far stop-loss or liquidation price would otherwise not be seen at all.
  const edges = {};
  for (const side of ["above", "below"]) {
    edges[side] = document.createElement("div");
    edges[side].className = `chart-offscale ${side}`;
    edges[side].id = `chart-${side}`;
    edges[side].dataset.testid = `chart-${side}`;
    edges[side].hidden = true;
    container.append(edges[side]);
  }
  // Back to the newest candle, shown while it is out of its place: a trader reading older
  // candles (or whose fling stopped short) comes back with one click, not a long drag.
  const back = document.createElement("button");
  back.type = "button";
  back.className = "btn btn-small chart-newest";
  back.id = "chart-newest";
  back.dataset.testid = "chart-newest";
  back.title = "Scroll to the newest candle";
  back.setAttribute("aria-label", back.title);
  back.textContent = "»";
  back.hidden = true;
  back.addEventListener("click", () => {
    toNewest();
    back.hidden = true;
  });
  container.append(back);
  let edgesDue = false;
  const markEdges = () => {
    edgesDue = false;
    const timeScale = chart.timeScale();
    // more than a candle left of where toNewest puts it (a zoom keeps that in pixels)
    back.hidden = lastTime === null ||
      timeScale.scrollPosition() > rightOffsetPx / timeScale.options().barSpacing - 1;
    back.style.right = `${chart.priceScale("right").width() + 8}px`;
    const height = chart.paneSize().height;
    const out = { above: [], below: [] };
    for (const line of lines) {
      const { price, title } = line.options();
      const y = series.priceToCoordinate(price);
      if (y === null) continue;
      const side = y < 0 ? "above" : y > height ? "below" : null;
      if (side) out[side].push(`${side === "above" ? "▲" : "▼"} ${title} ${series.priceFormatter().format(price)}`);
    }
    for (const side of ["above", "below"]) {
      edges[side].textContent = out[side].join("\n");
      edges[side].hidden = !out[side].length;
    }
  };
  // after the chart has drawn the change (its scale is set when it draws)
  const markEdgesSoon = () => {
    if (edgesDue) return;
    edgesDue = true;
    requestAnimationFrame(() => requestAnimationFrame(markEdges));
  };
  // Older candles: ``wantOlder(oldestS)`` is told the oldest candle's time (unix s) while the
  // view is near it, at most once a frame; whoever loads them gives them to prependKlines.
  let wantOlder = null;
  let olderDue = false;
  const askOlder = () => {
    olderDue = false;
    const range = chart.timeScale().getVisibleLogicalRange();
    const bars = series.data();
    if (wantOlder && range && bars.length && range.from < OLDER_MARGIN_BARS) wantOlder(bars[0].time);
  };
  const askOlderSoon = () => {
    if (olderDue) return;
    olderDue = true;
    requestAnimationFrame(askOlder);
  };
  chart.timeScale().subscribeVisibleLogicalRangeChange(markEdgesSoon);
  chart.timeScale().subscribeVisibleLogicalRangeChange(askOlderSoon);
  new ResizeObserver(markEdgesSoon).observe(container); // a taller chart scales anew

  return {
    setPriceStep(step) {
      const precision = decimalsOf(step);
      const minMove = Number(step);
      series.applyOptions({
        priceFormat: {
          type: "custom",
          formatter: (price) => chartPrice(price, step),
          minMove: Number.isFinite(minMove) && minMove > 0 ? minMove : 10 ** -precision,
        },
      });
    },

    // A price as the chart's axis and labels write it.
    priceText(price) {
      return series.priceFormatter().format(price);
    },

    // Klines oldest first (sorted and deduplicated here anyway: the chart requires it).
    setKlines(klines) {
      const byTime = new Map();
      for (const kline of klines || []) {
        const bar = toBar(kline);
        if (bar) byTime.set(bar.time, bar);
      }
      const bars = [...byTime.values()].sort((a, b) => a.time - b.time);
      series.setData(bars);
      lastTime = bars.length ? bars[bars.length - 1].time : null;
      toNewest();
      markEdgesSoon();
      askOlderSoon();
    },

    // Calls ``listener(oldestS)`` while the view is near the oldest candle drawn (above).
    onOlderWanted(listener) {
      wantOlder = listener;
      askOlderSoon();
    },

    // Candles older than the oldest drawn, put before it (any other is ignored): the view stays
    // on the candles it shows. Returns how many were added.
    prependKlines(klines) {
      const drawn = series.data();
      if (!drawn.length) return 0;
      const byTime = new Map();
      for (const kline of klines || []) {
        const bar = toBar(kline);
        if (bar && bar.time < drawn[0].time) byTime.set(bar.time, bar);
      }
      if (!byTime.size) return 0;
      const bars = [...byTime.values()].sort((a, b) => a.time - b.time);
      series.setData([...bars, ...drawn]);
      askOlderSoon(); // the view may still reach past them
      return bars.length;
    },

    // The current candle (or a newer one); an older candle than the last drawn is ignored.
    update(kline) {
      const bar = toBar(kline);
      if (!bar || (lastTime !== null && bar.time < lastTime)) return;
      try {
        series.update(bar);
        lastTime = bar.time;
        markEdgesSoon();
      } catch {
        /* the chart refuses out-of-order bars; the next load redraws */
      }
    },

    // Horizontal lines: [{price: "98.5", title: "long 0.1", kind}], kind one of LINE_STYLES'
    // keys: a position's entry, liquidation, take-profit and stop-loss; a pending order's trigger.
    setLines(wanted) {
      for (const line of lines) series.removePriceLine(line);
      lines = [];
      for (const item of wanted) {
        const price = Number(item.price);
        const look = LINE_STYLES[item.kind];
        if (!Number.isFinite(price) || !look) continue;
        lines.push(series.createPriceLine({
          price,
          title: item.title,
          color: color(look.color, look.fallback),
          lineWidth: 1,
          lineStyle: look.lineStyle,
          axisLabelVisible: true,
        }));
      }
      makeRoomFor(lines.map((line) => line.options().title));
      markEdgesSoon();
    },
  };
}
