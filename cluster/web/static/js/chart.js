// The candlestick chart (TradingView Lightweight Charts, vendored under static/vendor).

import { chartPrice, decimalsOf, isoToSeconds } from "./format.js";

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
    // room right of the newest candle, as trading charts keep it: the candle being built
    // (and its time label) stays clear of the price axis
    timeScale: {
      borderColor: color("--line", "#242e48"),
      timeVisible: true,
      secondsVisible: false,
      rightOffset: 6,
      barSpacing: 8,
    },
  });
  const series = chart.addSeries(LC.CandlestickSeries, {
    upColor: up,
    downColor: down,
    borderUpColor: up,
    borderDownColor: down,
    wickUpColor: up,
    wickDownColor: down,
  });
  let lastTime = null;
  let lines = [];

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
      chart.timeScale().scrollToRealTime();
    },

    // The current candle (or a newer one); an older candle than the last drawn is ignored.
    update(kline) {
      const bar = toBar(kline);
      if (!bar || (lastTime !== null && bar.time < lastTime)) return;
      try {
        series.update(bar);
        lastTime = bar.time;
      } catch {
        /* the chart refuses out-of-order bars; the next load redraws */
      }
    },

    // Horizontal lines: [{price: "98.5", title: "long entry", kind: "entry"|"liquidation"}].
    setLines(wanted) {
      for (const line of lines) series.removePriceLine(line);
      lines = [];
      for (const item of wanted) {
        const price = Number(item.price);
        if (!Number.isFinite(price)) continue;
        lines.push(series.createPriceLine({
          price,
          title: item.title,
          color: item.kind === "liquidation" ? down : color("--accent", "#4c8dff"),
          lineWidth: 1,
          lineStyle: item.kind === "liquidation" ? 2 : 0,
          axisLabelVisible: true,
        }));
      }
    },
  };
}
