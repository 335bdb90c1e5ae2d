/**
 * A saved plotly figure, drawn interactively with the plotly.js bundled in this extension.
 *
 * plotly.js is loaded on first use (a separate chunk of the extension, served by the Jupyter
 * server like the rest of it: no CDN, so it works air-gapped) and only when a detail is opened.
 */
import * as React from 'react';

import { getFigure } from './api';
import { IThemeColors, themedLayout } from './model';

type PlotlyModule = typeof import('plotly.js-dist-min');

let plotly: Promise<PlotlyModule> | null = null;

function loadPlotly(): Promise<PlotlyModule> {
  if (!plotly) {
    plotly = import('plotly.js-dist-min').then(
      mod => ((mod as any).default ?? mod) as PlotlyModule
    );
  }
  return plotly;
}

function themeColors(): IThemeColors {
  const style = getComputedStyle(document.body);
  const get = (name: string, fallback: string) =>
    style.getPropertyValue(name).trim() || fallback;
  return {
    font: get('--jp-ui-font-color1', '#333'),
    grid: get('--jp-border-color2', '#ddd'),
    fontFamily: get('--jp-ui-font-family', 'sans-serif')
  };
}

/** Re-render when JupyterLab switches between light and dark themes. */
function useThemeKey(): string {
  const read = () =>
    `${document.body.dataset.jpThemeName ?? ''}|${document.body.dataset.jpThemeLight ?? ''}`;
  const [key, setKey] = React.useState(read);
  React.useEffect(() => {
    const observer = new MutationObserver(() => setKey(read()));
    observer.observe(document.body, { attributes: true, attributeFilter: ['data-jp-theme-name'] });
    return () => observer.disconnect();
  }, []);
  return key;
}

export interface IFigureProps {
  sessionId: string;
  name: string;
  /** Changes when the session is updated, to redraw a running session's figure. */
  version: number;
}

export function PlotlyFigure(props: IFigureProps): JSX.Element {
  const node = React.useRef<HTMLDivElement>(null);
  const [error, setError] = React.useState('');
  const [ready, setReady] = React.useState(false);
  const themeKey = useThemeKey();

  React.useEffect(() => {
    let cancelled = false;
    const div = node.current;
    if (!div) {
      return;
    }
    setError('');
    Promise.all([getFigure(props.sessionId, props.name), loadPlotly()])
      .then(async ([spec, Plotly]) => {
        if (cancelled) {
          return;
        }
        const width = div.clientWidth;
        await Plotly.react(div, spec.data ?? [], themedLayout(spec.layout, themeColors(), width) as any, {
          responsive: true,
          displaylogo: false,
          // In the narrow sidebar the mode bar would cover the title; drag still zooms.
          displayModeBar: width < 480 ? false : 'hover',
          // Keep every request local: no "edit in chart studio" link.
          showLink: false,
          showSendToCloud: false
        } as any);
        setReady(true);
      })
      .catch(reason => !cancelled && setError(String(reason?.message ?? reason)));
    return () => {
      cancelled = true;
    };
  }, [props.sessionId, props.name, props.version, themeKey]);

  // The side panel resizes without a window resize event, so watch the element itself.
  React.useEffect(() => {
    const div = node.current;
    if (!div || typeof ResizeObserver === 'undefined') {
      return;
    }
    const observer = new ResizeObserver(() => {
      if (div.offsetWidth > 0) {
        void loadPlotly().then(Plotly => div.querySelector('.main-svg') && Plotly.Plots.resize(div));
      }
    });
    observer.observe(div);
    return () => {
      observer.disconnect();
      void loadPlotly().then(Plotly => Plotly.purge(div));
    };
  }, []);

  return (
    <figure className="jp-PromptscopeFigure" aria-label={`Figure ${props.name}`}>
      {!ready && !error && <div className="jp-PromptscopeMuted">Drawing figure…</div>}
      {error && (
        <div className="jp-PromptscopeError" role="alert">
          The figure could not be drawn: {error}
        </div>
      )}
      <div ref={node} className="jp-PromptscopeFigure-plot" />
    </figure>
  );
}
