/**
 * The sessions side panel: a searchable, filterable list of the workspace's sessions and, on a
 * click, one session's detail (source, params, summary table, figures) with its actions.
 *
 * All user-supplied text (names, prompts, params) is rendered as React text nodes, never as
 * HTML, so a prompt such as `<img src=x onerror=...>` is shown, not run.
 */
import {
  Dialog,
  InputDialog,
  Notification,
  ReactWidget,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import {
  addBelowIcon,
  Button,
  caretLeftIcon,
  deleteIcon,
  downloadIcon,
  editIcon,
  HTMLSelect,
  InputGroup,
  refreshIcon,
  ToolbarButtonComponent
} from '@jupyterlab/ui-components';
import { CommandRegistry } from '@lumino/commands';
import { Message } from '@lumino/messaging';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';
import * as React from 'react';

import {
  deleteSession,
  downloadExport,
  getSession,
  listSessions,
  renameSession
} from './api';
import { PlotlyFigure } from './figure';
import { promptscopeIcon } from './icon';
import {
  absoluteTime,
  canShowMore,
  countLabel,
  formatCell,
  hasFilters,
  IFilters,
  ISessionDetail,
  ISessionPage,
  ISessionSummary,
  NO_FILTERS,
  relativeTime,
  STATUSES
} from './model';

/** Sessions fetched per page; "Show more" adds another page. */
const PAGE_SIZE = 50;
/** How often the list is refreshed while the panel is visible (ms). */
const POLL_INTERVAL = 3000;

export const INSERT_COMMAND = 'promptscope:insert-load-cell';

export interface ISessionsPanelOptions {
  commands: CommandRegistry;
}

/** The left-sidebar widget. */
export class SessionsPanel extends ReactWidget {
  constructor(options: ISessionsPanelOptions) {
    super();
    this._commands = options.commands;
    this.id = 'promptscope-sessions';
    this.addClass('jp-PromptscopePanel');
    this.title.icon = promptscopeIcon;
    this.title.caption = 'promptscope sessions';
    this.node.setAttribute('role', 'region');
    this.node.setAttribute('aria-label', 'promptscope sessions');
  }

  /** Fetch the list now (the poll does it every few seconds while the panel is shown). */
  refresh(): void {
    this._refreshRequested.emit();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this.refresh();
  }

  render(): JSX.Element {
    return (
      <SessionsView
        commands={this._commands}
        isVisible={() => this.isVisible}
        refreshRequested={this._refreshRequested}
      />
    );
  }

  private _commands: CommandRegistry;
  private _refreshRequested = new Signal<this, void>(this);
}

interface IViewProps {
  commands: CommandRegistry;
  isVisible: () => boolean;
  refreshRequested: ISignal<SessionsPanel, void>;
}

function messageOf(reason: unknown): string {
  return reason instanceof Error ? reason.message : String(reason);
}

function SessionsView(props: IViewProps): JSX.Element {
  const [filters, setFilters] = React.useState<IFilters>(NO_FILTERS);
  const [limit, setLimit] = React.useState(PAGE_SIZE);
  const [page, setPage] = React.useState<ISessionPage | null>(null);
  const [loadError, setLoadError] = React.useState('');
  const [selected, setSelected] = React.useState<string | null>(null);
  const query = React.useRef({ filters, limit });
  const poll = React.useRef<Poll | null>(null);
  const lastSelected = React.useRef<string | null>(null);

  const fetchList = React.useCallback(async () => {
    const { filters, limit } = query.current;
    try {
      const result = await listSessions(filters, limit);
      // Drop answers to an older query (the user typed on meanwhile).
      if (query.current.filters === filters && query.current.limit === limit) {
        setPage(result);
        setLoadError('');
      }
    } catch (reason) {
      setLoadError(messageOf(reason));
      throw reason; // lets the poll back off while the server is away
    }
  }, []);

  React.useEffect(() => {
    const p = new Poll({
      auto: true,
      factory: fetchList,
      frequency: { interval: POLL_INTERVAL, backoff: true, max: 60 * 1000 },
      name: 'promptscope:sessions',
      standby: () => !props.isVisible() || 'when-hidden'
    });
    poll.current = p;
    const refresh = () => void p.refresh();
    props.refreshRequested.connect(refresh);
    return () => {
      props.refreshRequested.disconnect(refresh);
      p.dispose();
    };
  }, []);

  // Typing in the search box waits a moment; menus and "Show more" refresh at once.
  React.useEffect(() => {
    query.current = { filters, limit };
    const delay = setTimeout(() => void poll.current?.refresh(), 200);
    return () => clearTimeout(delay);
  }, [filters, limit]);

  const update = (change: Partial<IFilters>) => {
    setFilters(current => ({ ...current, ...change }));
    setLimit(PAGE_SIZE);
  };

  const back = () => {
    lastSelected.current = selected;
    setSelected(null);
    void poll.current?.refresh();
  };

  if (selected) {
    const summary = page?.sessions.find(s => s.id === selected);
    return (
      <SessionDetailView
        id={selected}
        version={summary?.updated ?? 0}
        commands={props.commands}
        onBack={back}
        onDeleted={() => {
          lastSelected.current = null;
          back();
        }}
        onChanged={() => void poll.current?.refresh()}
      />
    );
  }
  return (
    <div className="jp-PromptscopeList">
      <div className="jp-PromptscopeHeader">
        <h2 className="jp-PromptscopeTitle">Sessions</h2>
        <ToolbarButtonComponent
          icon={refreshIcon}
          tooltip="Refresh the list"
          aria-label="Refresh the list"
          onClick={() => void poll.current?.refresh()}
        />
      </div>
      <Filters page={page} filters={filters} onChange={update} />
      <SessionList
        page={page}
        loadError={loadError}
        filters={filters}
        focusId={lastSelected.current}
        onOpen={setSelected}
        onClear={() => update(NO_FILTERS)}
        onMore={() => setLimit(limit + PAGE_SIZE)}
      />
    </div>
  );
}

interface IFiltersProps {
  page: ISessionPage | null;
  filters: IFilters;
  onChange: (change: Partial<IFilters>) => void;
}

function Filters(props: IFiltersProps): JSX.Element {
  const { page, filters, onChange } = props;
  const menu = (key: 'kind' | 'model' | 'status', label: string, values: string[]) => {
    // Keep a chosen value in the menu even when the current page no longer has it.
    const all = filters[key] && !values.includes(filters[key]) ? [...values, filters[key]] : values;
    const id = `jp-PromptscopeFilter-${key}`;
    return (
      <div className="jp-PromptscopeFilter">
        <label htmlFor={id}>{label}</label>
        <HTMLSelect
          id={id}
          value={filters[key]}
          onChange={event => onChange({ [key]: event.target.value })}
          options={[{ label: 'All', value: '' }, ...all.map(v => ({ label: v, value: v }))]}
        />
      </div>
    );
  };
  return (
    <div className="jp-PromptscopeFilters" role="search">
      <label htmlFor="jp-PromptscopeSearch" className="jp-PromptscopeVisuallyHidden">
        Search sessions
      </label>
      <InputGroup
        id="jp-PromptscopeSearch"
        className="jp-PromptscopeSearch"
        type="search"
        placeholder="Search sessions"
        title="Matches the name, the prompt text and the model; every word must match"
        value={filters.search}
        rightIcon="ui-components:search"
        onChange={event => onChange({ search: (event.target as HTMLInputElement).value })}
      />
      <div className="jp-PromptscopeFilterRow">
        {menu('kind', 'Kind', page?.kinds ?? [])}
        {menu('model', 'Model', page?.models ?? [])}
        {menu('status', 'Status', STATUSES)}
      </div>
    </div>
  );
}

interface IListProps {
  page: ISessionPage | null;
  loadError: string;
  filters: IFilters;
  focusId: string | null;
  onOpen: (id: string) => void;
  onClear: () => void;
  onMore: () => void;
}

function SessionList(props: IListProps): JSX.Element {
  const { page, loadError, filters } = props;
  const list = React.useRef<HTMLUListElement>(null);

  // Back from a detail: put the focus on the session that was open.
  React.useEffect(() => {
    if (props.focusId && list.current) {
      const item = list.current.querySelector<HTMLElement>(
        `[data-session-id="${CSS.escape(props.focusId)}"]`
      );
      item?.focus();
    }
  }, [props.focusId, page !== null]);

  if (loadError && !page) {
    return <EmptyState title="Cannot load sessions" message={loadError} error />;
  }
  if (!page) {
    return <div className="jp-PromptscopeMuted jp-PromptscopeEmpty">Loading sessions…</div>;
  }
  if (page.error) {
    return <EmptyState title="The session store cannot be read" message={page.error} error />;
  }
  if (page.total === 0 && !hasFilters(filters)) {
    return (
      <EmptyState
        title="No sessions yet"
        message={
          'Run a %%prompt cell (or promptscope.run_prompt) in a notebook under this folder; ' +
          `its session appears here. Store: ${page.store}`
        }
      />
    );
  }
  return (
    <>
      <div className="jp-PromptscopeCount" aria-live="polite">
        {countLabel(
          page.sessions.length,
          page.total,
          page.sessions.length < page.total && !canShowMore(page)
        )}
        {loadError && <span className="jp-PromptscopeError"> (offline: {loadError})</span>}
      </div>
      {page.total === 0 ? (
        <div className="jp-PromptscopeEmpty">
          <p>No session matches these filters.</p>
          <Button small onClick={props.onClear}>
            Clear filters
          </Button>
        </div>
      ) : (
        <ul className="jp-PromptscopeSessions" ref={list} aria-label="Sessions, newest first">
          {page.sessions.map(s => (
            <li key={s.id}>
              <SessionItem session={s} onOpen={props.onOpen} />
            </li>
          ))}
        </ul>
      )}
      {canShowMore(page) && (
        <Button className="jp-PromptscopeMore" small minimal onClick={props.onMore}>
          Show more
        </Button>
      )}
    </>
  );
}

function StatusBadge(props: { status: string }): JSX.Element {
  return (
    <span className={`jp-PromptscopeStatus jp-mod-${props.status}`} title={`Status: ${props.status}`}>
      {props.status}
    </span>
  );
}

function SessionItem(props: {
  session: ISessionSummary;
  onOpen: (id: string) => void;
}): JSX.Element {
  const s = props.session;
  return (
    <button
      type="button"
      className="jp-PromptscopeSession"
      data-session-id={s.id}
      onClick={() => props.onOpen(s.id)}
    >
      <span className="jp-PromptscopeSession-top">
        <span className="jp-PromptscopeSession-name">{s.name}</span>
        <StatusBadge status={s.status} />
      </span>
      <span className="jp-PromptscopeSession-meta">
        <span className="jp-PromptscopeSession-kind">{s.kind}</span>
        {s.model && <span className="jp-PromptscopeSession-model">{s.model}</span>}
        <time dateTime={new Date(s.created * 1000).toISOString()} title={absoluteTime(s.created)}>
          {relativeTime(s.created)}
        </time>
      </span>
    </button>
  );
}

function EmptyState(props: { title: string; message: string; error?: boolean }): JSX.Element {
  return (
    <div className="jp-PromptscopeEmpty" role={props.error ? 'alert' : 'status'}>
      <promptscopeIcon.react tag="span" className="jp-PromptscopeEmpty-icon" />
      <p className="jp-PromptscopeEmpty-title">{props.title}</p>
      <p className={props.error ? 'jp-PromptscopeError' : 'jp-PromptscopeMuted'}>
        {props.message}
      </p>
    </div>
  );
}

interface IDetailProps {
  id: string;
  version: number;
  commands: CommandRegistry;
  onBack: () => void;
  onDeleted: () => void;
  onChanged: () => void;
}

function SessionDetailView(props: IDetailProps): JSX.Element {
  const [detail, setDetail] = React.useState<ISessionDetail | null>(null);
  const [error, setError] = React.useState('');
  const [table, setTable] = React.useState('rows');
  const [reload, setReload] = React.useState(0);
  const backButton = React.useRef<HTMLButtonElement>(null);

  React.useEffect(() => {
    backButton.current?.focus();
  }, [props.id]);

  React.useEffect(() => {
    let cancelled = false;
    getSession(props.id)
      .then(d => {
        if (!cancelled) {
          setDetail(d);
          setError('');
          if (!d.tables.includes(table) && d.tables.length) {
            setTable(d.tables[0]);
          }
        }
      })
      .catch(reason => !cancelled && setError(messageOf(reason)));
    return () => {
      cancelled = true;
    };
  }, [props.id, props.version, reload]);

  const rename = async () => {
    if (!detail) {
      return;
    }
    const answer = await InputDialog.getText({
      title: 'Rename session',
      label: 'New name',
      text: detail.name
    });
    const name = answer.value?.trim();
    if (!answer.button.accept || !name || name === detail.name) {
      return;
    }
    try {
      await renameSession(props.id, name);
      setReload(reload + 1);
      props.onChanged();
    } catch (reason) {
      void showErrorMessage('Rename failed', messageOf(reason));
    }
  };

  const remove = async () => {
    if (!detail) {
      return;
    }
    const answer = await showDialog({
      title: 'Delete session?',
      // A string body is shown as text, so a name with markup stays harmless.
      body: `“${detail.name}” (${detail.id}) and its ${detail.n_rows} rows will be deleted. This cannot be undone.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await deleteSession(props.id);
      Notification.success(`Deleted session ${detail.name}`, { autoClose: 3000 });
      props.onDeleted();
    } catch (reason) {
      void showErrorMessage('Delete failed', messageOf(reason));
    }
  };

  const exportAs = async (format: 'csv' | 'html') => {
    try {
      const filename = await downloadExport(props.id, format, table);
      Notification.info(`Downloading ${filename}`, { autoClose: 3000 });
    } catch (reason) {
      void showErrorMessage('Export failed', messageOf(reason));
    }
  };

  const insert = () => {
    void props.commands.execute(INSERT_COMMAND, { id: props.id });
  };

  return (
    <div className="jp-PromptscopeDetail">
      <div className="jp-PromptscopeHeader">
        <button
          ref={backButton}
          type="button"
          className="jp-PromptscopeBack"
          onClick={props.onBack}
          aria-label="Back to the session list"
        >
          <caretLeftIcon.react tag="span" />
          Sessions
        </button>
      </div>
      {error && (
        <EmptyState title="This session cannot be shown" message={error} error />
      )}
      {!detail && !error && <div className="jp-PromptscopeMuted">Loading…</div>}
      {detail && (
        <>
          <div className="jp-PromptscopeDetail-title">
            <h2 className="jp-PromptscopeTitle">{detail.name}</h2>
            <StatusBadge status={detail.status} />
          </div>
          <div className="jp-PromptscopeActions" role="toolbar" aria-label="Session actions">
            <Button small onClick={insert} title="Add a cell that loads this session below the active cell">
              <addBelowIcon.react tag="span" /> Insert in notebook
            </Button>
            <Button small minimal onClick={() => void rename()}>
              <editIcon.react tag="span" /> Rename
            </Button>
            <Button
              small
              minimal
              onClick={() => void remove()}
              className="jp-PromptscopeDanger"
              disabled={detail.status === 'running'}
              title={
                detail.status === 'running'
                  ? 'Still running in a kernel: interrupt it or let it finish first'
                  : 'Delete this session'
              }
            >
              <deleteIcon.react tag="span" /> Delete
            </Button>
          </div>
          <div className="jp-PromptscopeActions" role="group" aria-label="Export">
            {detail.tables.length > 1 && (
              <HTMLSelect
                aria-label="Table to export"
                value={table}
                onChange={event => setTable(event.target.value)}
                options={detail.tables}
              />
            )}
            <Button
              small
              minimal
              disabled={!detail.tables.length}
              onClick={() => void exportAs('csv')}
            >
              <downloadIcon.react tag="span" /> CSV
            </Button>
            <Button small minimal onClick={() => void exportAs('html')}>
              <downloadIcon.react tag="span" /> HTML report
            </Button>
          </div>
          <dl className="jp-PromptscopeMeta">
            <dt>Kind</dt>
            <dd>{detail.kind}</dd>
            <dt>Model</dt>
            <dd>{detail.model || '—'}</dd>
            <dt>Rows</dt>
            <dd>{detail.n_rows}</dd>
            <dt>Created</dt>
            <dd>{absoluteTime(detail.created)}</dd>
            <dt>Id</dt>
            <dd>
              <code>{detail.id}</code>
            </dd>
          </dl>
          {detail.error && (
            <section aria-label="Error">
              <h3>Error</h3>
              <pre className="jp-PromptscopeError">{detail.error}</pre>
            </section>
          )}
          {detail.figures.map(name => (
            <PlotlyFigure key={name} sessionId={detail.id} name={name} version={detail.updated} />
          ))}
          {detail.summary_table && (
            <section aria-label="Summary table">
              <h3>
                Summary
                {detail.summary_table.total > detail.summary_table.rows.length &&
                  ` (first ${detail.summary_table.rows.length} of ${detail.summary_table.total} rows)`}
              </h3>
              <div className="jp-PromptscopeTableWrap">
                <table className="jp-PromptscopeTable">
                  <thead>
                    <tr>
                      {detail.summary_table.columns.map(c => (
                        <th key={c} scope="col">
                          {c}
                        </th>
                      ))}
                    </tr>
                  </thead>
                  <tbody>
                    {detail.summary_table.rows.map((row, i) => (
                      <tr key={i}>
                        {row.map((cell, j) => (
                          <td key={j} className={typeof cell === 'number' ? 'jp-mod-number' : ''}>
                            {formatCell(cell)}
                          </td>
                        ))}
                      </tr>
                    ))}
                  </tbody>
                </table>
              </div>
            </section>
          )}
          {detail.summary_error && (
            <p className="jp-PromptscopeMuted">No summary: {detail.summary_error}</p>
          )}
          {detail.source && (
            <section aria-label="Source">
              <h3>Source</h3>
              <pre className="jp-PromptscopeSource">{detail.source}</pre>
            </section>
          )}
          <section aria-label="Parameters">
            <h3>Parameters</h3>
            <pre className="jp-PromptscopeSource">{JSON.stringify(detail.params, null, 2)}</pre>
          </section>
        </>
      )}
    </div>
  );
}
