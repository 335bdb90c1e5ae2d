import { describe, expect, it } from 'vitest';

import {
  canShowMore,
  countLabel,
  formatCell,
  hasFilters,
  isValidId,
  listQuery,
  loadCellSource,
  NO_FILTERS,
  relativeTime,
  themedLayout
} from '../model';

describe('session ids', () => {
  it('accepts store ids and refuses anything that could escape a string or a path', () => {
    expect(isValidId('20261125-101500-1a2b3c')).toBe(true);
    for (const bad of ['', '..', 'a/b', 'x"); import os; ("', '<img src=x>', 'a b', '-x']) {
      expect(isValidId(bad)).toBe(false);
    }
  });

  it('builds the load cell only for valid ids', () => {
    expect(loadCellSource('20261125-101500-1a2b3c')).toBe(
      'import promptscope\n\npromptscope.load("20261125-101500-1a2b3c")'
    );
    expect(() => loadCellSource('x")\nimport os')).toThrow(/Not a session id/);
  });
});

describe('list queries', () => {
  it('leaves out empty filters and trims the search', () => {
    expect(listQuery(NO_FILTERS, 50)).toBe('limit=50&offset=0');
    const q = new URLSearchParams(
      listQuery({ search: '  paris & co ', kind: 'prompt', model: '', status: 'done' }, 10, 20)
    );
    expect(q.get('search')).toBe('paris & co');
    expect(q.get('kind')).toBe('prompt');
    expect(q.has('model')).toBe(false);
    expect([q.get('status'), q.get('limit'), q.get('offset')]).toEqual(['done', '10', '20']);
  });

  it('knows when a filter is set', () => {
    expect(hasFilters(NO_FILTERS)).toBe(false);
    expect(hasFilters({ ...NO_FILTERS, search: '   ' })).toBe(false);
    expect(hasFilters({ ...NO_FILTERS, model: 'gpt2' })).toBe(true);
  });
});

describe('formatting', () => {
  it('says how long ago', () => {
    const now = 1_800_000_000;
    expect(relativeTime(now - 10, now)).toBe('just now');
    expect(relativeTime(now - 300, now)).toBe('5 min ago');
    expect(relativeTime(now - 3 * 3600, now)).toBe('3 h ago');
    expect(relativeTime(now - 86400 - 5, now)).toBe('yesterday');
    expect(relativeTime(now - 4 * 86400, now)).toBe('4 days ago');
    expect(relativeTime(now - 30 * 86400, now)).toMatch(/^\d{4}-\d{2}-\d{2}$/);
    expect(relativeTime(now + 100, now)).toBe('just now'); // clocks a little apart
  });

  it('formats table cells as text', () => {
    expect(formatCell(null)).toBe('');
    expect(formatCell(3)).toBe('3');
    expect(formatCell(0.123456)).toBe('0.1235');
    expect(formatCell(1.5e-7)).toBe('1.500e-7');
    expect(formatCell([1, 'a'])).toBe('[1,"a"]');
    expect(formatCell('<b>x</b>')).toBe('<b>x</b>'); // React renders it as text
  });

  it('counts sessions', () => {
    expect(countLabel(1, 1)).toBe('1 session');
    expect(countLabel(12, 12)).toBe('12 sessions');
    expect(countLabel(50, 80)).toBe('50 of 80 sessions');
  });

  it('adapts a figure layout to the theme without losing its own settings', () => {
    const colors = { font: '#eee', grid: '#444', fontFamily: 'Inter' };
    const out = themedLayout({ width: 900, title: { text: 'p' }, xaxis: { title: 'v' } }, colors);
    expect(out.width).toBeUndefined();
    expect(out.autosize).toBe(true);
    expect(out.title).toEqual({ text: 'p' });
    expect(out.xaxis).toEqual({
      title: 'v',
      gridcolor: '#444',
      zerolinecolor: '#444',
      automargin: true
    });
    expect(out.height).toBe(380);
    expect(out.font.color).toBe('#eee');
    expect(out.paper_bgcolor).toBe('rgba(0,0,0,0)');
    expect(themedLayout(undefined, colors).margin.l).toBe(56);
    const narrow = themedLayout({ title: 'Choice probability', height: 2000 }, colors, 260);
    expect(narrow.legend.orientation).toBe('h');
    expect(narrow.title).toMatchObject({ text: 'Choice probability', font: { size: 12 }, x: 0 });
    expect(narrow.height).toBe(900);
  });
});

describe('paging', () => {
  const page = (shown: number, total: number) => ({
    sessions: Array.from({ length: shown }, (_, i) => ({ id: String(i) })),
    total,
    max_limit: 500
  }) as any;

  it('offers more until the server cap, then says how to reach the rest', () => {
    expect(canShowMore(page(50, 80))).toBe(true);
    expect(canShowMore(page(80, 80))).toBe(false);
    expect(canShowMore(page(500, 812))).toBe(false);
    expect(countLabel(500, 812, true)).toBe(
      '500 of 812 sessions; search or filter to reach older ones'
    );
    expect(countLabel(3, 3)).toBe('3 sessions');
  });
});
